"""Run a FineTuneJob spec on this machine: the same trainer, through the same torchrun launcher
the pods use (`kubetune_trainer.launch`), with c10d rendezvous on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kubetune_operator.specs import FineTuneJob
from kubetune_trainer.config import TrainConfig, environment, load_validated


def load_spec(path: Path) -> FineTuneJob:
    return load_validated(path, FineTuneJob)


def default_nproc() -> int:
    try:
        import torch

        return max(torch.cuda.device_count(), 1)
    except ImportError:
        return 1


def torchrun_command(config_path: Path, nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kubetune_trainer.launch",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        "--max-restarts",
        "0",
        "-m",
        "kubetune_trainer",
        "--config",
        str(config_path),
    ]


def run_local(config: TrainConfig, nproc: int, env: dict[str, str] | None = None) -> int:
    """Write the config where the trainer reads it and run torchrun; returns its exit code."""
    with tempfile.TemporaryDirectory(prefix="kubetune-local-") as tmp:
        config_path = Path(tmp) / "train.json"
        config_path.write_text(config.model_dump_json(by_alias=True, indent=1))
        merged = {**os.environ, **(env or {})}
        merged.setdefault("OMP_NUM_THREADS", str(max((os.cpu_count() or 1) // nproc, 1)))
        merged.setdefault(environment.METRICS_ADDRESS, "127.0.0.1")  # a workstation: not the whole network
        return subprocess.call(torchrun_command(config_path, nproc), env=merged)


def check_data(config: TrainConfig, as_json: bool = False, env: dict[str, str] | None = None) -> int:
    """`kubetune validate --data`: the trainer's own data check, in the trainer's environment."""
    with tempfile.TemporaryDirectory(prefix="kubetune-check-") as tmp:
        config_path = Path(tmp) / "train.json"
        config_path.write_text(config.model_dump_json(by_alias=True, indent=1))
        command = [sys.executable, "-m", "kubetune_trainer.datacheck", "--config", str(config_path)]
        return subprocess.call(command + (["--json"] if as_json else []), env={**os.environ, **(env or {})})


def mirror_weights(configs: list[TrainConfig], to: str | None = None) -> int:
    """`kubetune weights mirror`: the trainer's own fetch and checks, in the trainer's environment."""
    with tempfile.TemporaryDirectory(prefix="kubetune-mirror-") as tmp:
        command = [sys.executable, "-m", "kubetune_trainer.mirroring"]
        for index, config in enumerate(configs):
            path = Path(tmp) / f"train-{index}.json"
            path.write_text(config.model_dump_json(by_alias=True, indent=1))
            command += ["--config", str(path)]
        return subprocess.call(command + (["--to", to] if to else []))


def kill_tree(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL a process and all its descendants, as a node failure would.

    torchrun starts its workers in sessions of their own, so killing the process group is not
    enough to take a whole local run down. The tree is stopped first, until no new descendant
    appears: a process that forks between a scan of /proc and the kill would otherwise escape.
    Returns once every victim is gone (or a zombie: it holds no memory, GPU memory included).
    """
    stopped: set[int] = set()
    while new := _descendants(pid) - stopped:
        for victim in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGSTOP)
        stopped |= new
    for victim in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while any(_running(victim) for victim in stopped) and time.monotonic() < deadline:
        time.sleep(0.01)  # SIGKILL is delivered asynchronously


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _descendants(pid: int) -> set[int]:
    """`pid` and every live process below it, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo.extend(children.get(current, []))
    return found
