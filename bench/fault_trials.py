"""Kill a real two-process run at random moments and count what the restart makes of it.

Each trial starts `kubetune run --local` (SAM2 tiny at 64 px, two processes, a checkpoint every
--every steps, output on local disk), waits a random time after training begins, then either
SIGKILLs every process (a lost node) or sends SIGTERM to the launcher only (what the kubelet does
on preemption), and runs the same spec again to the end. Per trial and in total it prints:

  resumed    the second run started at the newest complete checkpoint (or at 0 when none)
  lost       steps done before the fault that the second run does again (measured for SIGTERM,
             bounded by --every for SIGKILL)
  corrupt    checkpoints the resume had to pass over (damaged or refused)

    uv run python bench/fault_trials.py --trials 6 --steps 60 --every 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from kubetune.local import kill_tree
from kubetune.synthetic import write_coco_dataset


def spec(data: Path, out: Path, steps: int, every: int) -> dict:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "faults", "namespace": "bench"},
        "spec": {
            "model": {"family": "sam2", "variant": "sam2.1_hiera_tiny", "imageSize": 64},
            "data": {
                "source": data.as_uri() + "/",
                "format": "coco",
                "train": "train/annotations.json",
                "numWorkers": 0,
            },
            "training": {"maxSteps": steps, "batchSize": 2, "precision": "fp32", "optimizer": {"lr": 1e-3}},
            "output": {"uri": out.as_uri() + "/", "checkpointEvery": every, "keepLast": 3},
        },
    }


def events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        start = line.find("{")
        if start >= 0:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line[start:]))
    return out


def start(spec_path: Path, log: Path, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "kubetune.cli", "run", str(spec_path), "--local", "--nproc-per-node", "2"]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def trial(n: int, how: str, args: argparse.Namespace, root: Path, data: Path, rng: random.Random) -> dict:
    out, cache = root / f"out-{n}", root / f"cache-{n}"
    spec_path = root / f"spec-{n}.yaml"
    spec_path.write_text(yaml.safe_dump(spec(data, out, args.steps, args.every)))
    env = {**os.environ, "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    first_log = root / f"first-{n}.log"
    proc = start(spec_path, first_log, env)
    while '"event": "training"' not in first_log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise RuntimeError(first_log.read_text()[-2000:])
        time.sleep(0.1)
    time.sleep(rng.uniform(0.5, args.max_wait))
    if how == "SIGKILL":
        kill_tree(proc.pid)
    else:
        children = [
            int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir() for c in (t / "children").read_text().split()
        ]
        for child in children:
            os.kill(child, signal.SIGTERM)
    first_code = proc.wait()
    saved = sorted(int(p.parent.name[5:]) for p in (out / "checkpoints").glob("*/manifest.json"))
    second_log = root / f"second-{n}.log"
    second = start(spec_path, second_log, env)
    second_code = second.wait()
    started = next((e.get("start_step") for e in events(second_log) if e.get("event") == "training"), None)
    newest = saved[-1] if saved else 0
    skipped = sum(1 for e in events(second_log) if e.get("event") == "checkpoint unusable, trying an older one")
    preempted = next((e["step"] for e in events(first_log) if e.get("event") == "preempted"), None)
    # SIGTERM: the step every rank stopped at is known; SIGKILL: at most the steps since the newest
    # checkpoint are done again (the loop does not log every step).
    lost = max(preempted - (started or 0), 0) if preempted is not None else f"<{args.every}"
    return {
        "trial": n,
        "fault": how,
        "first_exit": first_code,
        "second_exit": second_code,
        "resumed": started == newest,
        "resume_step": started,
        "lost": lost,
        "corrupt": skipped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--max-wait", type=float, default=6.0, help="seconds after training begins")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kubetune-faults-") as tmp:
        root = Path(tmp)
        data = write_coco_dataset(root / "data", train=8, val=2, size=64, seed=1)
        rows = [trial(n, ("SIGKILL", "SIGTERM")[n % 2], args, root, data, rng) for n in range(args.trials)]
    print(f"{'trial':>5} {'fault':>8} {'exit':>5} {'resumed':>8} {'at':>4} {'lost':>5} {'corrupt':>8} {'then':>5}")
    for r in rows:
        print(f"{r['trial']:>5} {r['fault']:>8} {r['first_exit']:>5} {r['resumed']!s:>8} {r['resume_step']!s:>4} "
              f"{r['lost']:>5} {r['corrupt']:>8} {r['second_exit']:>5}")  # fmt: skip
    for how in ("SIGKILL", "SIGTERM"):
        mine = [r for r in rows if r["fault"] == how]
        if mine:
            print(
                f"{how}: {len(mine)} trials, resumed at the newest checkpoint {sum(r['resumed'] for r in mine)}, "
                f"steps lost {[r['lost'] for r in mine]}, corrupt checkpoints {sum(r['corrupt'] for r in mine)}, "
                f"finished {sum(r['second_exit'] == 0 for r in mine)}"
            )


if __name__ == "__main__":
    main()
