"""structlog setup: JSON lines in pods (what log collectors parse), readable lines on a terminal;
each rank's lines also kept in a local file (uploaded beside the checkpoints when the process
ends, so they outlive the pod) and the last few in memory (for the termination message)."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path

import structlog

from kubetune_trainer.config import environment

TAIL_LINES = 12
ROTATE_BYTES = 64 << 20
_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
_file: Path | None = None


class _Tee:
    """stderr, plus a local file (rotated at ROTATE_BYTES, one old file kept) and the tail."""

    def __init__(self, stream, path: Path) -> None:
        self.stream, self.path = stream, path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.out = path.open("a")

    def write(self, text: str) -> int:
        self.stream.write(text)
        _tail.extend(line for line in text.splitlines() if line.strip())
        try:
            self.out.write(text)
            if self.out.tell() > ROTATE_BYTES:
                self.out.close()
                os.replace(self.path, self.path.with_suffix(".1.log"))
                self.out = self.path.open("a")
        except OSError:  # a full disk must not stop training for its logs
            pass
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        with contextlib.suppress(OSError):
            self.out.flush()


_training = False


def training_started() -> None:
    """Every input has been checked and training begins: from here on, the log is worth keeping
    at output.uri (before, a bad input writes nothing there)."""
    global _training
    _training = True


def training_began() -> bool:
    return _training


def tail() -> list[str]:
    """The last lines this process logged."""
    return list(_tail)


def log_file() -> Path | None:
    return _file


def configure(rank: int | None = None) -> None:
    """Route structlog and stdlib logging to stderr; JSON unless stderr is a terminal.

    KUBETUNE_LOG_FORMAT=json|console overrides the guess; KUBETUNE_LOG_LEVEL sets the level.
    """
    fmt = os.environ.get(environment.LOG_FORMAT) or ("console" if sys.stderr.isatty() else "json")
    level_name = os.environ.get(environment.LOG_LEVEL, environment.DEFAULT_LOG_LEVEL).upper()
    level = getattr(logging, level_name, logging.INFO)
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        renderer,
    ]
    global _file
    _file = Path(tempfile.gettempdir()) / "kubetune-logs" / f"rank-{rank or 0}-{os.getpid()}.log"
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=_Tee(sys.stderr, _file)),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")
    if rank is not None:
        structlog.contextvars.bind_contextvars(rank=rank)
