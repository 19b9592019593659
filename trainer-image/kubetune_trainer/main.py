"""Trainer entry point (what torchrun runs): parse config -> pick the family's recipe -> train ->
clean up. Every failure ends as an exit code the Job understands (see `errors`) and a one-line
reason where Kubernetes shows it.

torchrun --nproc-per-node 2 -m kubetune_trainer --config train.json
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

import structlog

from kubetune_trainer import logs
from kubetune_trainer.config import TrainConfig, environment, load_validated
from kubetune_trainer.errors import ADVICE, EXIT_OK, KubetuneError, exit_code_of, failure_class, redact

log = structlog.get_logger("kubetune_trainer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune_trainer", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig JSON (the operator's ConfigMap)")
    args = parser.parse_args(argv)
    logs.configure(int(os.environ.get("RANK", 0)))
    ctx, config = None, None
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
        record_exit(exc.exit_code)
        log.error("training failed", reason=str(exc), exit_code=exc.exit_code, failure_class=kind)
        write_termination_reason(_reason(kind, str(exc)), logs.tail())
        return exc.exit_code
    except Exception as exc:  # a crash is worth a retry by the Job; an OOM or a divergence is not
        kind, code = failure_class(exc), exit_code_of(exc)
        record_exit(code)
        log.exception("training crashed", failure_class=kind, exit_code=code)
        write_termination_reason(_reason(kind, f"{type(exc).__name__}: {exc}"), logs.tail())
        return code
    finally:
        if config is not None and logs.training_began():
            upload_log(config, int(os.environ.get("RANK", 0)))
        if ctx is not None:
            from kubetune_trainer.training import distributed

            distributed.cleanup()


def record_exit(code: int) -> None:
    """Tell the launcher, first thing, that this rank fails and how (environment.EXIT_RECORD_DIR)."""
    folder = os.environ.get(environment.EXIT_RECORD_DIR)
    if folder:
        rank = int(os.environ.get("RANK", 0))
        record = {"time": time.time(), "rank": rank, "exit_code": code}
        with contextlib.suppress(OSError):
            (Path(folder) / f"rank-{rank}.json").write_text(json.dumps(record))


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


def upload_log(config, rank: int) -> None:
    """This rank's log, compressed, to output.uri/logs/: it outlives the pod (kept briefly on a
    storage outage: the pod's own log is still there)."""
    path = logs.log_file()
    if path is None or not path.is_file():
        return
    from kubetune_trainer.storage.stores import open_store

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    packed = path.with_suffix(".log.gz")
    try:
        with path.open("rb") as src, gzip.open(packed, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.environ[environment.STORAGE_RETRY_S] = "15"  # the job is ending: do not hold it up
        open_store(config.output.uri, config.storage).upload(packed, f"logs/{stamp}-rank{rank}.log.gz")
    except Exception as exc:  # failing to keep a log must not change how the run ends
        log.warning("log not uploaded", reason=str(exc))
    finally:
        packed.unlink(missing_ok=True)


def write_termination_reason(reason: str, tail: list[str] | None = None) -> None:
    """Write the last log lines and, last, the one-line reason where the kubelet reads them
    (it keeps 4096 bytes; the operator reads the last line as the reason and the rest as
    status.lastFailure), with anything like a credential redacted. Silently skipped where there
    is no such file: Kubernetes only creates /dev/termination-log inside containers."""
    default = Path(environment.DEFAULT_TERMINATION_LOG)
    path = Path(os.environ.get(environment.TERMINATION_LOG, default))
    if not path.parent.is_dir() or (path == default and not path.exists()):
        return
    line = redact(" ".join(reason.split()))[:2000]
    lines = [redact(t)[:240] for t in (tail or [])]
    while lines and len("\n".join([*lines, line]).encode()) > 4000:  # kubelet keeps at most 4096 bytes
        lines.pop(0)
    with contextlib.suppress(OSError):  # failing to explain must not hide the failure
        path.write_text("\n".join([*lines, line]) + "\n")


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
