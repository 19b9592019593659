"""structlog setup: JSON lines in pods (what log collectors parse), readable lines on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog

from kubetune_trainer.config import environment


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
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")
    if rank is not None:
        structlog.contextvars.bind_contextvars(rank=rank)
