"""torchrun, with the trainer's exit code kept: `python -m kubetune_trainer.launch <torchrun args>`.

torchrun reports any failed worker as exit code 1. Kubernetes' podFailurePolicy must tell
"bad config/data, do not retry" (2) and "preempted, retry for free" (3) from everything else, so
when every failed worker exited with one of those the launcher exits with it as well. SIGTERM to
the launcher (the kubelet's, to PID 1) is forwarded to the workers by torchrun, which waits for
them: they checkpoint the step they reached (see `training.preemption`), and the launcher exits 3.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from kubetune_trainer.config import environment
from kubetune_trainer.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED, EXIT_RETRYABLE


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kubetune-exits-") as records:
        os.environ[environment.EXIT_RECORD_DIR] = records  # the workers inherit it
        try:
            run(args)
        except ChildFailedError as exc:  # the first rank to fail says why; the others were stopped after it
            codes = sorted(failure.exitcode for failure in exc.failures.values())
            rank, code = first_failure(Path(records)) or _torchrun_first(exc)
            print(f"kubetune: rank {rank} failed first (exit code {code}); all: {codes}", file=sys.stderr)
            return code if code in (EXIT_BAD_INPUT, EXIT_PREEMPTED) else EXIT_RETRYABLE
        except SignalException as exc:  # torchrun forwarded it and waited for the workers to stop
            print(f"kubetune: stopped by {signal.Signals(exc.sigval).name}", file=sys.stderr)
            return EXIT_PREEMPTED if exc.sigval == signal.SIGTERM else EXIT_RETRYABLE
    return 0


def first_failure(records: Path) -> tuple[int, int] | None:
    """(rank, exit code) of the earliest failure the ranks recorded themselves (see
    `main.record_exit`), or None when none did (a rank killed before it could)."""
    found = []
    for path in records.glob("rank-*.json"):
        try:
            record = json.loads(path.read_text())
            found.append((float(record["time"]), int(record["rank"]), int(record["exit_code"])))
        except (OSError, ValueError, KeyError):
            continue
    return min(found)[1:] if found else None


def _torchrun_first(exc: ChildFailedError) -> tuple[int, int]:
    rank, failure = exc.get_first_failure()
    return rank, failure.exitcode


if __name__ == "__main__":
    sys.exit(main())
