"""Graceful preemption: SIGTERM (a node drain, a spot reclaim, Kueue taking the quota back)
becomes a last checkpoint at the step reached, then exit 3, which the Job retries without
counting it against backoffLimit.

The signal reaches ranks at different moments (torchrun forwards it to each worker), so after
every step the ranks agree with one tiny all-reduce: when any rank was told to stop, all stop
at the same step, and the checkpoint holds a state every rank shares.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import structlog
import torch

from kubetune_trainer.errors import Preempted
from kubetune_trainer.training import distributed

log = structlog.get_logger(__name__)
_forks_detached = False


def _own_group() -> None:
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


class Preemption:
    def __init__(self) -> None:
        self.requested = threading.Event()

    def install(self) -> Preemption:
        """Catch SIGTERM in this process (the main thread's job: call it there). torchrun signals
        each worker's whole process group, and a DataLoader worker dies of a SIGTERM that is not
        its parent's, taking the step down with it: processes forked from here on get a group of
        their own (they still end with their parent)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            global _forks_detached
            if not _forks_detached:
                os.register_at_fork(after_in_child=_own_group)
                _forks_detached = True
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.requested.is_set():
            log.warning("SIGTERM: finishing this step, then a checkpoint and exit 3")
        self.requested.set()

    def agreed(self) -> bool:
        """Whether any rank was told to stop (a collective: every rank calls it after each step)."""
        flag = torch.tensor([1 if self.requested.is_set() else 0], dtype=torch.int64)
        return bool(distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX).item())

    @staticmethod
    def stop(step: int, uri: str | None) -> Preempted:
        log.warning("preempted", step=step, checkpoint=uri)
        return Preempted(f"Preempted at step {step}; checkpoint {uri} holds it, the retry resumes there")
