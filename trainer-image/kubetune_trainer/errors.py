"""Fatal errors, their exit codes, and the one-line reason Kubernetes shows for a failed pod.

Exit codes (the operator's podFailurePolicy relies on them):
  0  training finished (or stopped early)
  1  a retryable failure: crash, lost peer, out of memory, storage hiccup
  2  bad config or data: retrying cannot help, the Job fails at once
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

EXIT_OK = 0
EXIT_RETRYABLE = 1
EXIT_BAD_INPUT = 2

TERMINATION_LOG_ENV = "KUBETUNE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"


class KubetuneError(Exception):
    """Base of the trainer's own errors; `exit_code` tells the launcher whether to retry."""

    exit_code = EXIT_RETRYABLE


class ConfigError(KubetuneError):
    """The config cannot work as written (unknown variant, missing bucket, bad URI...)."""

    exit_code = EXIT_BAD_INPUT


class DataError(KubetuneError):
    """The dataset cannot be used (no usable sample, unreadable annotations...)."""

    exit_code = EXIT_BAD_INPUT


def write_termination_reason(reason: str) -> None:
    """Write a one-line reason where the kubelet reads it; silently skip when there is no such file.

    Kubernetes only creates /dev/termination-log inside containers; a local run has none.
    """
    path = Path(os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG))
    if not path.parent.is_dir() or (path == Path(DEFAULT_TERMINATION_LOG) and not path.exists()):
        return
    line = " ".join(reason.split())[:4000]  # kubelet keeps at most 4096 bytes
    with contextlib.suppress(OSError):  # failing to explain must not hide the failure
        path.write_text(line + "\n")
