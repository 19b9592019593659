"""Why a run stopped, as a class the operator shows: each failure's class, exit code and advice,
and a diverged run stopped by the loop itself instead of burning GPU hours on NaNs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from kubetune_trainer.errors import (
    ConfigError,
    DataError,
    NonFiniteLoss,
    Preempted,
    StorageUnavailable,
    exit_code_of,
    failure_class,
)
from kubetune_trainer.main import _reason

from tests.helpers import make_trainer


class DistBackendError(RuntimeError):  # torch.distributed's, by name: the class is matched by name
    pass


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "OOM", 2),
        (MemoryError(), "OOM", 2),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate ... out of memory"), "OOM", 2),
        (FloatingPointError("Loss became infinite or NaN at iteration=7!"), "NonFiniteLoss", 2),  # Detectron2's
        (NonFiniteLoss("NaN for 20 steps"), "NonFiniteLoss", 2),
        (DistBackendError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(...)"), "NCCLTimeout", 1),
        (StorageUnavailable("S3 unavailable"), "StorageUnavailable", 1),
        (Preempted("Preempted at step 4"), "Preempted", 3),
        (DataError("no usable sample"), "DataError", 2),
        (ConfigError("bad variant"), "ConfigError", 2),
        (KeyError("surprise"), "Crash", 1),
    ],
)
def test_each_failure_has_a_class_an_exit_code_and_advice(exc: BaseException, kind: str, code: int) -> None:
    assert failure_class(exc) == kind
    assert exit_code_of(exc) == code
    line = _reason(kind, str(exc))
    assert line.startswith(f"{kind}: ")
    if kind == "OOM":
        assert "batchSize" in line and "gradientCheckpointing" in line


def test_a_diverged_run_stops_after_a_run_of_nan_losses(tiny_coco: Path) -> None:
    trainer = make_trainer(tiny_coco, "fp32")
    trainer.total_steps = 100
    real = trainer.loss

    def nan_after_two(outputs, batch):
        terms = real(outputs, batch)
        if trainer.state.step >= 2:
            return SimpleNamespace(total=terms.total * float("nan"), parts=terms.parts, metrics=terms.metrics)
        return terms

    trainer.loss = nan_after_two
    with pytest.raises(NonFiniteLoss, match="NaN/inf for 20 steps in a row"):
        trainer.train()
    assert trainer.state.step == 22  # two good steps, then twenty NaN ones: not a hundred


def test_the_termination_message_ends_with_the_reason_bounded_and_redacted(tmp_path: Path, monkeypatch) -> None:
    from kubetune_trainer.main import write_termination_reason

    path = tmp_path / "termination-log"
    path.write_text("")
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(path))
    tail = [f'{{"event": "step", "step": {i}, "detail": "{"x" * 300}"}}' for i in range(40)]
    tail.append(
        '{"event": "env", "line": "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG token=hf_abcdefghijklmnopqrstu"}'
    )
    write_termination_reason("OOM: CUDA out of memory; lower training.batchSize", tail)
    text = path.read_text()
    lines = text.splitlines()
    assert len(text.encode()) <= 4096 and lines[-1] == "OOM: CUDA out of memory; lower training.batchSize"
    assert "wJalrXUtnFEMI" not in text and "hf_abcdefghij" not in text and "***" in lines[-2]
    assert all(len(line) <= 240 for line in lines[:-1])  # the newest lines kept, each bounded


def test_the_launcher_reports_the_rank_that_failed_first_by_its_own_record(tmp_path) -> None:
    """A peer that crashed when the failing rank left (exit 1) may end first; the records say who
    failed first, and how."""
    import json

    from kubetune_trainer.launch import first_failure

    assert first_failure(tmp_path) is None
    (tmp_path / "rank-1.json").write_text(json.dumps({"time": 1000.5, "rank": 1, "exit_code": 1}))
    (tmp_path / "rank-0.json").write_text(json.dumps({"time": 1000.2, "rank": 0, "exit_code": 2}))
    (tmp_path / "rank-2.json").write_text("{torn")
    assert first_failure(tmp_path) == (0, 2)
