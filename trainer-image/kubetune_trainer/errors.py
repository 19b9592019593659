"""Fatal errors and their exit codes: the bottom of the trainer, importing nothing of it.

Exit codes (the operator's podFailurePolicy relies on them):
  0  training finished (or stopped early)
  1  a retryable failure: crash, lost peer, out of memory, storage hiccup
  2  bad config or data: retrying cannot help, the Job fails at once
  3  preempted (SIGTERM: node drain, spot reclaim, Kueue): a checkpoint was written at the
     step reached; the Job retries without spending its backoff budget
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 3


class KubetuneError(Exception):
    """Base of the trainer's own errors; `exit_code` tells the launcher whether to retry."""

    exit_code = EXIT_RETRYABLE


class ConfigError(KubetuneError):
    """The config cannot work as written (unknown variant, missing bucket, bad URI...)."""

    exit_code = EXIT_BAD_INPUT


class DataError(KubetuneError):
    """The dataset cannot be used (no usable sample, unreadable annotations...)."""

    exit_code = EXIT_BAD_INPUT


class StorageUnavailable(KubetuneError):
    """Object storage did not answer (outage, timeouts, 5xx, SlowDown) for longer than the retry
    budget: the pod is worth retrying, the job's input is not wrong."""


class Preempted(KubetuneError):
    """SIGTERM reached the job: every rank finished its step, rank 0 checkpointed it."""

    exit_code = EXIT_PREEMPTED
