"""Trainer entry point (what torchrun runs): parse config -> build -> train -> clean up.

torchrun --nproc-per-node 2 -m kubetune_trainer --config train.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TypeVar

import structlog
import yaml
from pydantic import BaseModel, ValidationError

from . import logs
from .config import TrainConfig
from .errors import EXIT_OK, EXIT_RETRYABLE, ConfigError, KubetuneError, write_termination_reason

log = structlog.get_logger("kubetune_trainer")
METRICS_PORT_ENV = "KUBETUNE_METRICS_PORT"
M = TypeVar("M", bound=BaseModel)


def load_validated(path: Path, model: type[M]) -> M:
    """Read a YAML or JSON document (YAML is a superset of JSON) and validate it with `model`."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML or JSON: {exc}") from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from exc


def describe_validation_error(exc: ValidationError) -> str:
    """'training.batchSize: Input should be greater than or equal to 1; ...' — one line."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune_trainer", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig JSON (the operator's ConfigMap)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logs.configure(rank)
    ctx = None
    try:
        config = load_validated(args.config, TrainConfig)
        structlog.contextvars.bind_contextvars(job=config.job.name)
        from . import distributed, recipe
        from .telemetry import PrometheusWriter

        ctx = distributed.init()
        metrics = PrometheusWriter(config.job.name, config.job.namespace, ctx.rank, config.model.family)
        _serve_metrics(metrics, ctx.local_rank)
        recipe.run(config, ctx, metrics)
        return EXIT_OK
    except KubetuneError as exc:
        log.error("training failed", reason=str(exc), exit_code=exc.exit_code)
        write_termination_reason(str(exc))
        return exc.exit_code
    except Exception as exc:  # anything else is worth a retry by the Job
        log.exception("training crashed")
        write_termination_reason(f"{type(exc).__name__}: {exc}")
        return EXIT_RETRYABLE
    finally:
        if ctx is not None:
            from . import distributed

            distributed.cleanup()


def _serve_metrics(metrics, local_rank: int) -> None:
    base = int(os.environ.get(METRICS_PORT_ENV, "9400"))
    if base <= 0:
        return
    try:
        port = metrics.serve(base + local_rank)
        log.info("metrics endpoint", port=port)
    except OSError as exc:  # a busy port must not kill a training run
        log.warning("metrics endpoint not started", port=base + local_rank, error=str(exc))


if __name__ == "__main__":
    sys.exit(main())
