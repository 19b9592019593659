"""Fatal errors and their exit codes: the bottom of the trainer, importing nothing of it.

Exit codes (the operator's podFailurePolicy relies on them):
  0  training finished (or stopped early)
  1  a retryable failure: crash, lost peer, out of memory, storage hiccup
  2  bad config or data: retrying cannot help, the Job fails at once
  3  preempted (SIGTERM: node drain, spot reclaim, Kueue): a checkpoint was written at the
     step reached; the Job retries without spending its backoff budget
"""

from __future__ import annotations

import re

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


class NonFiniteLoss(KubetuneError):
    """The loss stayed NaN/inf for many steps in a row: the run diverged, and a retry from the
    same checkpoint would diverge again."""

    exit_code = EXIT_BAD_INPUT


class OutOfMemory(KubetuneError):
    """A device (or the host) ran out of memory at this batch size: the same retry fails the same way."""

    exit_code = EXIT_BAD_INPUT


ADVICE = {
    "OOM": "lower training.batchSize (raise gradAccumulation to keep the total), lower model.imageSize, "
    "or set model.gradientCheckpointing",
    "NonFiniteLoss": "lower training.optimizer.lr, use precision bf16 or fp32, or set training.gradClip",
    "NCCLTimeout": "a rank stopped answering (a hung GPU or network); the Job retries from the newest checkpoint",
    "StorageUnavailable": "object storage did not answer; the Job retries",
    "Preempted": "the Job retries from the checkpoint written at preemption, without spending backoffLimit",
}


def failure_class(exc: BaseException) -> str:
    """The class the termination message starts with, which the operator puts in status."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = str(exc).lower()
    if isinstance(exc, OutOfMemory | MemoryError) or "OutOfMemoryError" in names or "out of memory" in text:
        return "OOM"
    if isinstance(exc, NonFiniteLoss | FloatingPointError):  # Detectron2 raises the latter on a NaN loss
        return "NonFiniteLoss"
    if "DistBackendError" in names and "timeout" in text or "watchdog caught collective operation timeout" in text:
        return "NCCLTimeout"
    for cls in (Preempted, StorageUnavailable, DataError, ConfigError):
        if isinstance(exc, cls):
            return cls.__name__
    return "Crash"


def exit_code_of(exc: BaseException) -> int:
    if isinstance(exc, KubetuneError):
        return exc.exit_code
    return EXIT_BAD_INPUT if failure_class(exc) in ("OOM", "NonFiniteLoss") else EXIT_RETRYABLE


SECRETS = (  # (pattern, whether its first group is a prefix to keep)
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), False),  # AWS access key ids
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"), False),  # Hugging Face tokens
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), True),
    (
        re.compile(
            r"(?i)((?:secret|token|password|passwd|credential|signature)[\w-]*[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"
        ),
        True,
    ),
)


def redact(text: str) -> str:
    """Log text with anything that looks like a credential replaced by ***, before it leaves the
    pod (a termination message, an Event, status)."""
    for pattern, keep in SECRETS:
        text = pattern.sub(lambda m, keep=keep: (m.group(1) if keep else "") + "***", text)
    return text
