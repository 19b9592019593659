"""The control loop's own rules (its behaviour against the real API server is in
test_status_from_watches.py and test_api_faults.py)."""

from __future__ import annotations

from kubetune_operator.loop import MAX_RETRY_S, retry_delay


def test_retries_back_off_exponentially_with_jitter_up_to_a_bound() -> None:
    delays = [[retry_delay(5.0, n) for _ in range(200)] for n in range(1, 10)]
    for n, tries in enumerate(delays, start=1):
        expected = min(MAX_RETRY_S, 5.0 * 2 ** (n - 1))
        assert all(0.8 * expected <= d <= 1.2 * expected for d in tries)
        assert max(tries) - min(tries) > 0.1 * expected  # spread, not in lockstep
    assert max(delays[-1]) <= 1.2 * MAX_RETRY_S
