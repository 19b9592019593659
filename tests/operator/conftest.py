from __future__ import annotations

import pytest


@pytest.fixture
def writers():
    """Trainer metrics endpoints served during a test (tests.operator.test_operator_on_cluster's
    serve_rank0), stopped after it."""
    opened: list = []
    yield opened
    for writer in opened:
        writer.stop()
