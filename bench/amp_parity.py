"""Mixed precision vs fp32 on the same data, side by side: loss tracking and images/s.

Runs the real trainer step (`Trainer.run_step`) for fp32, bf16 and fp16 from identical weights,
data order and prompts, and prints each step's loss next to fp32's, the largest relative gap over
the first steps, and throughput after warm-up. On a GPU this is the AMP correctness and speed
check; on a CPU it still runs (slowly) for a smoke test.

    uv run python bench/amp_parity.py --variant sam2.1_hiera_tiny --image-size 1024 --steps 30
    uv run python bench/amp_parity.py --variant sam2.1_hiera_base_plus --image-size 1024 --out bench/results/h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from kubetune.synthetic import write_coco_dataset
from kubetune_trainer.config import DataSpec, TrainConfig
from kubetune_trainer.datasets.checks import load_split
from kubetune_trainer.promptable.models.sam2 import Sam2Segmenter
from kubetune_trainer.promptable.recipe import build_loader, build_trainer
from kubetune_trainer.training.distributed import init


def make_config(root: Path, args: argparse.Namespace, precision: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": {
                "family": "sam2",
                "variant": args.variant,
                "imageSize": args.image_size,
                "trainable": args.trainable.split(","),
                "checkpoint": args.checkpoint,
            },
            "data": {
                "source": f"file://{root}/",
                "format": "coco",
                "train": "train/annotations.json",
                "numWorkers": args.workers,
            },
            "training": {
                "maxSteps": args.steps,
                "batchSize": args.batch_size,
                "precision": precision,
                "optimizer": {"lr": args.lr},
                "schedule": {"type": "constant"},
            },
            "output": {"uri": "file:///unused-output/"},
        }
    ).with_defaults()


def run(root: Path, args: argparse.Namespace, precision: str) -> dict:
    config = make_config(root, args, precision)
    ctx = init()
    torch.manual_seed(0)
    weights = Path(args.checkpoint.removeprefix("file://")) if args.checkpoint else None
    model = Sam2Segmenter().build(config.model, weights).to(ctx.device)
    samples = load_split(
        DataSpec(source=root.as_uri(), format="coco", train="train/annotations.json"), root, "train", None
    ).samples
    loader = build_loader(samples, config, ctx, model.pre, target_size=model.mask_side(config.model.image_size))
    trainer = build_trainer(model, loader, config, ctx, total_steps=args.steps)
    losses, seconds = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.run_step()  # ends with a loss all-reduce + .tolist(): a sync point, so timing is honest
        seconds.append(time.perf_counter() - start)
        losses.append(trainer.storage.scalars["loss"])
    timed = seconds[args.warmup :]
    memory = torch.cuda.max_memory_allocated() if ctx.device.type == "cuda" else None
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {
        "losses": losses,
        "images_per_second": args.batch_size * len(timed) / sum(timed),
        "peak_memory_bytes": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sam2.1_hiera_tiny")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the throughput")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--trainable", default="mask_decoder,prompt_encoder")
    parser.add_argument("--checkpoint", default=None, help="file:// Meta checkpoint (random init without it)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--compare-steps", type=int, default=10, help="steps over which losses are compared")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        root = write_coco_dataset(Path(tmp), train=max(args.batch_size * 8, 32), val=1, size=512, seed=0)
        results = {p: run(root, args, p) for p in args.precisions.split(",")}

    base = results.get("fp32")
    n = min(args.compare_steps, args.steps)
    for name, r in results.items():
        if base is not None and name != "fp32":
            pairs = zip(r["losses"][:n], base["losses"][:n], strict=True)
            r["max_loss_gap_vs_fp32"] = max(abs(a - b) / max(abs(b), 1e-8) for a, b in pairs)
            r["compared_steps"] = n
    print(f"\n{args.variant} @ {args.image_size}px, batch {args.batch_size}, trainable {args.trainable}")
    print("step  " + "  ".join(f"{p:>10}" for p in results))
    for step in range(min(args.compare_steps, args.steps)):
        print(f"{step + 1:>4}  " + "  ".join(f"{r['losses'][step]:>10.5f}" for r in results.values()))
    for name, r in results.items():
        line = f"{name}: {r['images_per_second']:.2f} images/s"
        if "max_loss_gap_vs_fp32" in r:
            gap = r["max_loss_gap_vs_fp32"]
            line += f", {r['images_per_second'] / base['images_per_second']:.2f}x fp32, max loss gap vs fp32 {gap:.2%}"
        if r["peak_memory_bytes"]:
            line += f", peak memory {r['peak_memory_bytes'] / 2**30:.1f} GiB"
        print(line)
    if args.out:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "date": datetime.now(UTC).isoformat(),
            "device": device,
            "torch": torch.__version__,
            "args": {k: str(v) for k, v in vars(args).items()},
            "results": results,
        }
        args.out.write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
