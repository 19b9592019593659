"""The GPU kit's stages, in order of value; `bench/gpu/run.sh` runs this (see bench/README.md).

Each stage runs its work as child processes under the stage's own time cap, so a hung NCCL call
or a CUDA crash costs one stage, not the round; a stage that fails is recorded with its error and
the next one runs. results.json, results.md and stages.log in --out are rewritten after every
stage, so a command cut off by the machine's limit still returns what it measured.

    python bench/gpu/kit.py --out DIR [--stages 1-5] [--tiny] [--deadline-s 540]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from kubetune.local import kill_tree

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
ROOT = BENCH.parent


class Failed(Exception):
    """The stage ran, and what it measured is wrong or missing."""

    def __init__(self, message: str, figures: dict | None = None) -> None:
        super().__init__(message)
        self.figures = figures or {}


class Skipped(Exception):
    """The stage cannot run on this machine (the message says why)."""


@dataclass
class Kit:
    work: Path
    tiny: bool
    deadline: float
    log: TextIO
    stage_deadline: float = 0.0

    @property
    def workers(self) -> int:
        """DataLoader workers: 8 on the GPU machine, none at CPU sizes, and fewer where /dev/shm
        (which carries their batches) is too small for 1024 px batches in flight."""
        if self.tiny:
            return 0
        shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").is_dir() else 0
        return 8 if shm >= 8 * 2**30 else 2 if shm >= 2 * 2**30 else 0

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Run a command (its own process group) under what is left of the stage's cap; output
        goes to stages.log. Returns the exit code; running out of time fails the stage."""
        self.log.write(f"\n$ {' '.join(argv)}\n")
        self.log.flush()
        left = self.stage_deadline - time.time()
        proc = subprocess.Popen(
            argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=max(left, 1))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)  # torchrun's workers live in sessions of their own
            proc.wait()
            raise Failed(f"cut off at the stage's time cap ({argv[1] if len(argv) > 1 else argv[0]})") from None

    def script(self, path: Path, *args: str) -> dict:
        """A Python script that writes its results as JSON to --out; its parsed JSON."""
        result = self.work / f"{path.stem}.json"
        result.unlink(missing_ok=True)
        try:
            code = self.run([sys.executable, str(path), *args, "--out", str(result)])
        except Failed as exc:  # cut off: keep what the script wrote so far
            raise Failed(str(exc), json.loads(result.read_text()) if result.is_file() else {}) from None
        figures = json.loads(result.read_text()) if result.is_file() else {}
        if code != 0:
            problems = "; ".join(figures.get("problems", [])) or f"exited {code} (stages.log has its output)"
            raise Failed(problems, figures)
        return figures


@dataclass
class Stage:
    number: int
    name: str
    cap_s: dict[str, int]  # by size: "gpu" and "tiny"
    measure: Callable[[Kit], dict]
    summary: Callable[[dict], str]


# -- stage 1: the machine ------------------------------------------------------------------------


def environment(kit: Kit) -> dict:
    return kit.script(HERE / "probe.py", *([] if kit.tiny else ["--expect-gpu"]))


def environment_summary(f: dict) -> str:
    gpu = f.get("gpu", {})
    where = f"{gpu['name']}, {gpu['memory_gib']} GiB, driver {gpu['driver']}" if gpu.get("name") else "no GPU"
    matmul = f", bf16 matmul {gpu['matmul_bf16_tflops']} TFLOP/s" if gpu.get("matmul_bf16_tflops") else ""
    return f"{where}; torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), Python {f.get('python')}{matmul}"


# -- stage 2: a whole job, killed and resumed ----------------------------------------------------


def end_to_end(kit: Kit) -> dict:
    budget = str(int(kit.stage_deadline - time.time() - 10))
    args = ["--tiny"] if kit.tiny else []
    return kit.script(HERE / "end_to_end.py", *args, "--workers", str(kit.workers), "--budget-s", budget)


def end_to_end_summary(f: dict) -> str:
    bf16, fp16 = f.get("bf16_killed_and_resumed", {}), f.get("fp16", {})
    epochs = ", ".join(
        f"{e['images_per_second']:.1f}" + (f" ({e['data_wait_share']:.0%} data wait)" if "data_wait_share" in e else "")
        for e in bf16.get("epochs", [])
    )
    return (
        f"bf16: killed {bf16.get('first_exit_code')} after step {bf16.get('killed_after_checkpoint')}, "
        f"resumed from {bf16.get('resumed_from_step')} and exited {bf16.get('resumed_exit_code')}; "
        f"images/s by epoch {epochs}; skipped {bf16.get('skipped_steps')}; peak {gib(bf16.get('peak_gib'))}. "
        f"fp16: exited {fp16.get('exit_code')}, {fp16.get('skipped_steps')} skipped of {fp16.get('steps')}, "
        f"scale {fp16.get('grad_scale')}, {fmt(fp16.get('images_per_second'))} images/s"
    )


# -- stages 3 and 5: SAM2 and SAM throughput -----------------------------------------------------

TINY_THROUGHPUT = ["--image-size", "64", "--images", "8", "--batch", "2", "--steps", "3", "--warmup", "1"]
# On the GPU: 32 images and 10 timed steps per mode keep tiny and base_plus, six modes each,
# inside the stage's cap (the defaults, 64 images and 20 steps, ran past 200 s on an H100).
SAM2_ARGS = {
    "gpu": ["--images", "32", "--steps", "10", "--warmup", "2"],
    "tiny": ["--variants", "sam2.1_hiera_tiny", *TINY_THROUGHPUT, "--full-batch", "2"],
}
SAM_ARGS = {
    "gpu": ["--family", "sam", "--variants", "vit-base", "--modes", "batched,cached"],
    "tiny": ["--family", "sam", "--variants", "vit-base", "--modes", "batched,cached", *TINY_THROUGHPUT],
}


def throughput(args: list[str]) -> Callable[[Kit], dict]:
    def measure(kit: Kit) -> dict:
        return kit.script(BENCH / "sam2_throughput.py", *args[size(kit)], "--workers", str(kit.workers))

    return measure


def throughput_summary(f: dict) -> str:
    parts = []
    for row in f.get("results", []):
        modes = [m for m in row if isinstance(row[m], dict) and "images_per_second" in row[m]]
        rates = ", ".join(f"{m} {row[m]['images_per_second']:.1f}" + ratio(row[m]) for m in modes)
        encoder = row.get("encoder", {})
        share = encoder.get("bf16_peak_fraction")
        parts.append(
            f"{row['variant']}: {rates} images/s; encoder {encoder.get('tflops', 0):.1f} TFLOP/s"
            + (f" ({share:.0%} of bf16 peak)" if share else "")
        )
    return "; ".join(parts)


# -- stage 4: AMP parity -------------------------------------------------------------------------

AMP_ARGS = {
    "gpu": ["--variant", "sam2.1_hiera_tiny", "--image-size", "1024", "--steps", "30", "--compare-steps", "30"],
    "tiny": ["--image-size", "64", "--steps", "3", "--compare-steps", "3", "--warmup", "1", "--batch-size", "2"],
}


def amp_parity(kit: Kit) -> dict:
    return kit.script(BENCH / "amp_parity.py", *AMP_ARGS[size(kit)], "--workers", str(kit.workers))


def amp_summary(f: dict) -> str:
    rows = f.get("results", {})
    return "; ".join(
        f"{p}: {r['images_per_second']:.1f} images/s"
        + (f", loss gap {r['max_loss_gap_vs_fp32']:.2%} over {r['compared_steps']} steps" if p != "fp32" else "")
        + (f", peak {gib(r['peak_memory_bytes'] / 2**30)}" if r.get("peak_memory_bytes") else "")
        for p, r in rows.items()
    )


# -- stage 6: Detectron2 -------------------------------------------------------------------------

D2_ARGS = {
    "gpu": [
        *("--variant", "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", "--size", "800", "--batch", "8"),
        *("--iters", "60", "--warmup", "10", "--images", "64", "--precision", "fp16", "--s3"),
    ],
    "tiny": ["--iters", "6", "--warmup", "2", "--images", "8", "--s3"],
}


def has_detectron2(kit: Kit) -> bool:
    return kit.run([sys.executable, "-c", "import detectron2._C"]) == 0


def build_detectron2(kit: Kit) -> None:
    """Build the bundle's Detectron2 source into the kit's private site folder: with CUDA for
    this GPU's architecture only (minutes, not the quarter hour of a build for every GPU), or
    for the CPU where there is none (a rehearsal)."""
    source, site = os.environ.get("KUBETUNE_KIT_DETECTRON2_SRC"), os.environ.get("KUBETUNE_KIT_SITE")
    if not source or not Path(source).is_file() or not site:
        raise Skipped(
            "detectron2 is not installed and the bundle holds no source for it "
            "(here: `make detectron2`; for the GPU machine: bench/gpu/prepare.sh --detectron2-src DIR)"
        )
    with tarfile.open(source) as tar:
        tar.extractall(kit.work, filter="data")
    probe = "import torch; print('%d.%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else '')"
    arch = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    env = {"MAX_JOBS": str(os.cpu_count() or 4)} | ({"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch} if arch else {})
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-build-isolation"]
    if kit.run([*pip, "--target", site, str(kit.work / "detectron2")], env=env) != 0:
        raise Failed("the Detectron2 build failed (stages.log has the compiler's output)")


def detectron2(kit: Kit) -> dict:
    built = None
    if not has_detectron2(kit):
        started = time.time()
        build_detectron2(kit)
        built = round(time.time() - started, 1)
    figures = kit.script(BENCH / "d2_iteration_time.py", *D2_ARGS[size(kit)], "--workers", str(kit.workers))
    return figures | ({"build_seconds": built} if built else {})


def detectron2_summary(f: dict) -> str:
    if "kubetune_s_per_iter" not in f:
        return ""
    return (
        f"{f['variant']} at {f['size']} px, batch {f['batch']}, {f['precision']}: Detectron2 "
        f"{f['detectron2_s_per_iter']:.3f} s/iter, kubetune {f['kubetune_s_per_iter']:.3f} s/iter "
        f"(ratio {f['ratio_kubetune_over_detectron2']:.2f}), data wait {f['kubetune_data_wait_fraction']:.1%}"
        + (f"; built in {f['build_seconds']} s" if f.get("build_seconds") else "")
    )


STAGES = [
    Stage(1, "environment", {"gpu": 60, "tiny": 120}, environment, environment_summary),
    Stage(2, "end-to-end", {"gpu": 170, "tiny": 400}, end_to_end, end_to_end_summary),
    Stage(3, "sam2-throughput", {"gpu": 200, "tiny": 300}, throughput(SAM2_ARGS), throughput_summary),
    Stage(4, "amp-parity", {"gpu": 80, "tiny": 200}, amp_parity, amp_summary),
    Stage(5, "sam-throughput", {"gpu": 80, "tiny": 200}, throughput(SAM_ARGS), throughput_summary),
    Stage(6, "detectron2", {"gpu": 520, "tiny": 1200}, detectron2, detectron2_summary),
]


# -- goals, formatting, results ------------------------------------------------------------------


def size(kit: Kit) -> str:
    return "tiny" if kit.tiny else "gpu"


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} GiB"


def ratio(mode: dict) -> str:
    return f" ({mode['ratio']:.1f}x)" if "ratio" in mode else ""


def goals(stages: dict[str, dict]) -> list[dict]:
    """The issue's goals, each with what was measured (ratios from one run on one GPU)."""
    out = []

    def goal(text: str, value: float | None, met: Callable[[float], bool], shown: str) -> None:
        measured = value is not None
        out.append(
            {"goal": text, "measured": shown if measured else "not measured", "met": met(value) if measured else None}
        )

    for row in stages.get("sam2-throughput", {}).get("figures", {}).get("results", []):
        v = row["variant"]
        first = row.get("batched", {}).get("ratio")
        cached = row.get("cached", {}).get("ratio")
        share = row.get("encoder", {}).get("bf16_peak_fraction")
        goal(f"{v}: first epoch >= 15x the common recipe", first, lambda x: x >= 15, f"{fmt(first)}x")
        goal(f"{v}: cached epochs >= 35x the common recipe", cached, lambda x: x >= 35, f"{fmt(cached)}x")
        goal(f"{v}: encoder forward >= 40 % of bf16 peak", share, lambda x: x >= 0.40, f"{(share or 0):.0%}")
    d2 = stages.get("detectron2", {}).get("figures", {})
    if d2:
        r, wait = d2.get("ratio_kubetune_over_detectron2"), d2.get("kubetune_data_wait_fraction")
        goal("Detectron2: >= 1.0x its own AMPTrainer", r, lambda x: x >= 1.0, f"{fmt(r, 2)}x")
        goal("Detectron2: data wait < 5 % of step time", wait, lambda x: x < 0.05, f"{(wait or 0):.1%}")
    for precision, r in stages.get("amp-parity", {}).get("figures", {}).get("results", {}).items():
        gap = r.get("max_loss_gap_vs_fp32")
        if precision != "fp32":
            text = f"{precision} loss within 2 % of fp32 over the first 30 steps"
            goal(text, gap, lambda x: x <= 0.02, f"{(gap or 0):.2%}")
    return out


def markdown(record: dict) -> str:
    lines = [
        f"# kubetune GPU kit: {record['mode']}, {record['date']}",
        "",
        f"Machine: {record.get('machine') or 'see stage 1'}",
        "",
        "| stage | status | seconds | what it measured |",
        "| --- | --- | --- | --- |",
    ]
    for s in record["stages"]:
        detail = s.get("summary") or ""
        if s["error"]:
            detail = (detail + "<br>" if detail else "") + "**" + s["error"].splitlines()[0][:300] + "**"
        lines.append(f"| {s['number']} {s['name']} | {s['status']} | {s['seconds']:.0f} | {detail} |")
    if record["goals"]:
        judged = record["mode"] == "gpu"
        lines += ["", "| goal | measured | met |", "| --- | --- | --- |"]
        for g in record["goals"]:
            met = ("yes" if g["met"] else "no") if judged and g["met"] is not None else "not judged (CPU)"
            lines.append(f"| {g['goal']} | {g['measured']} | {met} |")
    return "\n".join(lines) + "\n"


@dataclass
class Recorder:
    out: Path
    mode: str
    workers: int
    stages: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Stages recorded in --out by an earlier command of the same mode are kept (the round's
        second command adds stage 6 to the first's 1-5); a stage run again replaces its entry."""
        previous = self.out / "results.json"
        if previous.is_file():
            record = json.loads(previous.read_text())
            if record.get("mode") == self.mode:
                self.stages = record["stages"]

    def add(self, entry: dict) -> None:
        self.stages = sorted(
            [s for s in self.stages if s["number"] != entry["number"]] + [entry], key=lambda s: s["number"]
        )
        self.write()

    def write(self) -> None:
        by_name = {s["name"]: s for s in self.stages}
        env = by_name.get("environment", {}).get("figures", {})
        record = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "mode": self.mode,
            "dataloader_workers": self.workers,
            "machine": environment_summary(env) if env else None,
            "stages": self.stages,
            "goals": goals(by_name),
        }
        (self.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
        (self.out / "results.md").write_text(markdown(record))


def parse_stages(text: str) -> list[int]:
    numbers: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        numbers |= set(range(int(low), int(high or low) + 1))
    return sorted(numbers)


def run_stage(stage: Stage, kit: Kit) -> dict:
    left = kit.deadline - time.time()
    cap = min(stage.cap_s[size(kit)], left - 5)
    entry = {"number": stage.number, "name": stage.name, "status": "", "seconds": 0.0, "figures": {}, "error": None}
    entry["summary"] = ""
    if cap < 15:
        entry |= {"status": "not run", "error": f"out of time ({left:.0f} s left of the command's deadline)"}
        return entry
    kit.log.write(f"\n===== stage {stage.number}: {stage.name} (cap {cap:.0f} s) =====\n")
    kit.log.flush()
    kit.stage_deadline = time.time() + cap
    started = time.time()
    try:
        entry["figures"] = stage.measure(kit)
        entry["status"] = "ok"
    except Skipped as exc:
        entry |= {"status": "skipped", "error": str(exc)}
    except Failed as exc:
        entry |= {"status": "failed", "error": str(exc), "figures": exc.figures}
    except Exception as exc:  # the kit's own bug in one stage must not cost the others
        entry |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    entry["seconds"] = round(time.time() - started, 1)
    entry["summary"] = stage.summary(entry["figures"]) if entry["figures"] else ""
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="1-6", help="e.g. 1-5, 6, 1,3")
    parser.add_argument("--tiny", action="store_true", help="CPU sizes: the dry run")
    parser.add_argument("--deadline-s", type=float, default=None, help="the whole command's time (default 540 s)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + (args.deadline_s or (1800 if args.tiny else 540))
    wanted = parse_stages(args.stages)
    with (args.out / "stages.log").open("a") as log, tempfile.TemporaryDirectory() as tmp:
        kit = Kit(Path(tmp), args.tiny, deadline, log)
        recorder = Recorder(args.out, "cpu-dry-run" if args.tiny else "gpu", kit.workers)
        for stage in (s for s in STAGES if s.number in wanted):
            entry = run_stage(stage, kit)
            recorder.add(entry)
            print(f"stage {stage.number} {stage.name}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
            if entry["error"]:
                print(f"  {entry['error'].splitlines()[0][:400]}", flush=True)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
