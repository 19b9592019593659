"""The host side of a feature-cached epoch: images per second the trainer's DataLoader and the
cache deliver to the step, decoding every image against skipping the ones the cache holds.

Three runs over the same synthetic COCO images, with the trainer's own `build_loader`:

  decode       no feature cache: every image is decoded, resized, normalised and padded;
  memory-held  `featureCache: memory` holding every entry: the sampler flags them, the workers
               only build masks and prompts (image size from the file header), and the step
               takes the features from the cache (on a GPU they already live there);
  disk-held    `featureCache: disk` with every entry on disk (warm in the page cache, as on a
               node after the first epoch): the same, and the step reads each entry's file.

Entries have the real shapes and dtype of the chosen SAM2 encoder's output at the image size
(one encoder forward finds them). Each mode runs whole epochs, alternating; the median counts.
No GPU is involved: this is how fast the host can feed cached steps.

    uv run python bench/loader_throughput.py --out bench/results/loader-cpu.json
    uv run python bench/loader_throughput.py --image-size 64 --images 8 --repeats 1 --workers 0   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from kubetune.synthetic import write_coco_dataset
from kubetune_trainer.config import DataSpec, TrainConfig
from kubetune_trainer.datasets.checks import load_split
from kubetune_trainer.promptable.feature_cache import FeatureCache
from kubetune_trainer.promptable.models.sam2 import Sam2Segmenter
from kubetune_trainer.promptable.recipe import build_loader
from kubetune_trainer.training.distributed import init

MODES = ("decode", "memory-held", "disk-held")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_config(root: Path, args: argparse.Namespace, cache: str) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": {"family": "sam2", "variant": args.variant, "imageSize": args.image_size, "featureCache": cache},
            "data": {
                "source": f"file://{root}/",
                "format": "coco",
                "train": "train/annotations.json",
                "numWorkers": args.workers,
                "horizontalFlip": False,  # one entry per image: every item is warm
            },
            "training": {"maxSteps": 1, "batchSize": args.batch, "precision": args.precision},
            "output": {"uri": "file:///unused-output/"},
        }
    ).with_defaults()


def entry_and_mask_side(args: argparse.Namespace) -> tuple[list[torch.Tensor], int]:
    """One image's encoder output levels, as the cache stores them, and the masks' side."""
    config = make_config(Path("/unused"), args, "off")
    module = Sam2Segmenter().build(config.model, None).eval()
    with torch.no_grad():
        levels = module.image_features(torch.zeros(1, 3, args.image_size, args.image_size))
    entry = [level[0].to(DTYPES[args.precision]).contiguous() for level in levels]
    return entry, module.mask_side(args.image_size)


def epoch_seconds(loader, cache: FeatureCache | None) -> tuple[float, int]:
    """One epoch of batches, with the features the step would take from the cache."""
    start = time.perf_counter()
    images = 0
    for batch in loader:
        if cache is not None:
            assert batch.decoded is not None and not any(batch.decoded), "a held image was decoded"
            assert all(cache.get(key) is not None for key in batch.keys)
        images += batch.num_images
    return time.perf_counter() - start, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sam2.1_hiera_tiny")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--source-size", type=int, default=None, help="stored images' side (default: --image-size)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--precision", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per mode")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.batch = min(args.batch, args.images)
    ctx = init()
    entry, mask_side = entry_and_mask_side(args)
    entry_mib = sum(t.numel() * t.element_size() for t in entry) / 2**20
    epochs: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source_size or args.image_size
        root = write_coco_dataset(Path(tmp), train=args.images, val=1, size=source, seed=0)
        samples = load_split(
            DataSpec(source=root.as_uri(), format="coco", train="train/annotations.json"), root, "train", None
        ).samples
        loaders = {}
        for mode, cache_mode in zip(MODES, ("off", "memory", "disk"), strict=True):
            config = make_config(root, args, cache_mode)
            pre = Sam2Segmenter().preprocess(config.model, None)
            cache = None
            if cache_mode != "off":
                cache = FeatureCache(cache_mode, "bench", torch.device("cpu"), Path(tmp) / "cache")
            loader = build_loader(samples, config, ctx, pre, cache, mask_side)
            if cache is not None:
                for index in range(len(samples)):
                    cache.put(loader.dataset.cache_key(0, index), entry)  # flips are off: one key per image
            loaders[mode] = (loader, cache)
            epoch_seconds(*loaders[mode])  # start the workers, warm the page cache
        counted = {}
        for _ in range(args.repeats):
            for mode in MODES:
                seconds, images = epoch_seconds(*loaders[mode])
                epochs[mode].append(seconds)
                counted[mode] = images
    results = {}
    for mode in MODES:
        median = statistics.median(epochs[mode])
        results[mode] = {"images_per_second": counted[mode] / median, "epoch_seconds": epochs[mode]}
    base = results["decode"]["images_per_second"]
    for mode in MODES:
        results[mode]["ratio"] = results[mode]["images_per_second"] / base
    hardware = f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(
        f"\n{hardware}; {args.images} images of {args.source_size or args.image_size} px to {args.image_size} px, "
        f"batch {args.batch}, {args.workers} workers; "
        f"cache entry {entry_mib:.1f} MiB ({args.variant}, {args.precision}); median of {args.repeats} epochs"
    )
    print(f"{'mode':12} {'images/s':>9} {'ratio':>7}")
    for mode in MODES:
        r = results[mode]
        print(f"{mode:12} {r['images_per_second']:9.1f} {r['ratio']:7.2f}")
    if args.out:
        meta = {"date": datetime.now(UTC).date().isoformat(), "hardware": hardware, "entry_mib": entry_mib}
        args.out.write_text(json.dumps({**meta, "args": vars(args) | {"out": str(args.out)}, **results}, indent=1))


if __name__ == "__main__":
    main()
