"""Trainer entry point (what torchrun runs): parse config -> pick the family's recipe -> train ->
clean up. Every failure ends as an exit code the Job understands (see `errors`) and a one-line
reason where Kubernetes shows it.

torchrun --nproc-per-node 2 -m kubetune_trainer --config train.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import structlog

from kubetune_trainer import logs
from kubetune_trainer.config import TrainConfig, environment, load_validated
from kubetune_trainer.errors import ADVICE, EXIT_OK, KubetuneError, exit_code_of, failure_class

log = structlog.get_logger("kubetune_trainer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune_trainer", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig JSON (the operator's ConfigMap)")
    args = parser.parse_args(argv)
    logs.configure(int(os.environ.get("RANK", 0)))
    ctx = None
    try:
        config = load_validated(args.config, TrainConfig)
        structlog.contextvars.bind_contextvars(job=config.job.name)
        from kubetune_trainer.metrics.prometheus import PrometheusWriter
        from kubetune_trainer.training import distributed

        run = recipe_for(config.model.family)
        ctx = distributed.init()
        metrics = PrometheusWriter(config.job.name, config.job.namespace, ctx.rank, config.model.family)
        _serve_metrics(metrics, ctx.local_rank)
        run(config, ctx, metrics)
        return EXIT_OK
    except KubetuneError as exc:
        kind = failure_class(exc)
        log.error("training failed", reason=str(exc), exit_code=exc.exit_code, failure_class=kind)
        write_termination_reason(_reason(kind, str(exc)))
        return exc.exit_code
    except Exception as exc:  # a crash is worth a retry by the Job; an OOM or a divergence is not
        kind, code = failure_class(exc), exit_code_of(exc)
        log.exception("training crashed", failure_class=kind, exit_code=code)
        write_termination_reason(_reason(kind, f"{type(exc).__name__}: {exc}"))
        return code
    finally:
        if ctx is not None:
            from kubetune_trainer.training import distributed

            distributed.cleanup()


def recipe_for(family: str):
    """The family's `run(config, ctx, metrics)`: Detectron2's, or the promptable one (SAM2, SAM).
    Imported here, so a SAM2 job never imports detectron2 and a Detectron2 job never imports sam2."""
    if family == "detectron2":
        from kubetune_trainer.d2.build import require_detectron2

        require_detectron2()  # a clear exit 2 where it is not installed
        from kubetune_trainer.d2 import recipe
    else:
        from kubetune_trainer.promptable import recipe
    return recipe.run


def _reason(kind: str, message: str) -> str:
    """`<class>: <message>[; <advice>]`, the line the operator reads into status."""
    advice = ADVICE.get(kind)
    return f"{kind}: {message}" + (f"; {advice}" if advice else "")


def write_termination_reason(reason: str) -> None:
    """Write a one-line reason where the kubelet reads it; silently skip when there is no such file.

    Kubernetes only creates /dev/termination-log inside containers; a local run has none.
    """
    default = Path(environment.DEFAULT_TERMINATION_LOG)
    path = Path(os.environ.get(environment.TERMINATION_LOG, default))
    if not path.parent.is_dir() or (path == default and not path.exists()):
        return
    line = " ".join(reason.split())[:4000]  # kubelet keeps at most 4096 bytes
    with contextlib.suppress(OSError):  # failing to explain must not hide the failure
        path.write_text(line + "\n")


def _serve_metrics(metrics, local_rank: int) -> None:
    base = int(os.environ.get(environment.METRICS_PORT, environment.DEFAULT_METRICS_PORT))
    if base <= 0:
        return
    address = os.environ.get(environment.METRICS_ADDRESS, environment.DEFAULT_METRICS_ADDRESS)
    try:
        port = metrics.serve(base + local_rank, address)
        log.info("metrics endpoint", address=address, port=port)
    except OSError as exc:  # a busy port must not kill a training run
        log.warning("metrics endpoint not started", port=base + local_rank, error=str(exc))


if __name__ == "__main__":
    sys.exit(main())
