"""SAM2 fine-tuning throughput: the common recipe vs kubetune's trainer, side by side in one run.

On the same synthetic images (4 objects each), model and frozen image encoder:

  common    the widely copied recipe: one image per step through SAM2ImagePredictor.set_image,
            one point per object, fp16 autocast + GradScaler (CUDA), AdamW 1e-5 / 4e-5, BCE +
            0.05·IoU-score loss at the original resolution;
  batched   kubetune's `Trainer.run_step`: `--batch` images per step from the DataLoader, the
            encoder under no_grad, bf16 autocast (CUDA; fp32 on a CPU);
  cached    the same with `model.featureCache: memory`, timed after one warm epoch (what every
            epoch after the first costs; the loader no longer decodes those images);
  cached-disk  `model.featureCache: disk`: the loader's workers read the entries (node-local
            disk, here warm in the page cache) in place of decoding;
  full      a full fine-tune: the image encoder trains too, `--full-batch` images per step;
  full-ckpt the same with `model.gradientCheckpointing` (less memory, more compute).

Prints images/s, the ratio to the common recipe, peak GPU memory, and the encoder forward's
TFLOP/s (FLOPs counted by torch.utils.flop_counter) against the GPU's dense bf16 peak.

`--family sam` measures SAM (v1, transformers' SamModel, random weights of the named size) through
the same trainer modes; the common recipe is SAM2's predictor, so there ratios are to `batched`.

    uv run python bench/sam2_throughput.py --out bench/results/sam2-h200.json   # tiny and base_plus
    uv run python bench/sam2_throughput.py --image-size 64 --images 8 --batch 2 --steps 4 --warmup 1   # CPU smoke
    uv run python bench/sam2_throughput.py --family sam --variants vit-base --modes batched,cached
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from kubetune.synthetic import write_coco_dataset
from kubetune_trainer.config import DataSpec, TrainConfig
from kubetune_trainer.datasets.checks import load_split
from kubetune_trainer.datasets.files import load_image
from kubetune_trainer.promptable.feature_cache import FeatureCache
from kubetune_trainer.promptable.models.registry import segmenter_for
from kubetune_trainer.promptable.recipe import build_loader, build_trainer
from kubetune_trainer.training.distributed import autocast, init
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name fragment.
BF16_PEAK = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}
OBJECTS = 4
DEFAULT_VARIANTS = {"sam2": "sam2.1_hiera_tiny,sam2.1_hiera_base_plus", "sam": "vit-base"}
MODES = ("common", "batched", "cached", "cached-disk", "full", "full-ckpt")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(step, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Seconds of each of `args.steps` calls of step(n), after `args.warmup` untimed ones (peak
    memory counts from the first timed step)."""
    times = []
    for n in range(args.warmup + args.steps):
        start = time.perf_counter()
        step(n)
        sync(device)
        if n == args.warmup - 1:
            reset_memory(device)
        times.append(time.perf_counter() - start)
    return times[args.warmup :]


def make_config(
    root: Path, args: argparse.Namespace, variant: str, cache: str, full: bool = False, recompute: bool = False
) -> TrainConfig:
    trainable = ["mask_decoder", "prompt_encoder"] + (["image_encoder"] if full else [])
    return TrainConfig.model_validate(
        {
            "model": {
                "family": args.family,
                "variant": variant,
                "imageSize": args.image_size,
                "featureCache": cache,
                "trainable": trainable,
                "gradientCheckpointing": recompute,
            },
            "data": {
                "source": f"file://{root}/",
                "format": "coco",
                "train": "train/annotations.json",
                "numWorkers": args.workers,
                "horizontalFlip": False,  # the common recipe does not flip either
                "prompts": {"type": "points", "positivePoints": 1, "maxObjects": OBJECTS},
            },
            "training": {
                "maxSteps": 10**6,
                "batchSize": args.full_batch if full else args.batch,
                "precision": args.precision,
                "loss": "simple",
                "schedule": {"type": "constant"},
            },
            "output": {"uri": "file:///unused-output/"},
        }
    ).with_defaults()


def build_model(config: TrainConfig, device: torch.device):
    torch.manual_seed(0)
    return segmenter_for(config.model).build(config.model, None).to(device)


def common_recipe(root: Path, args: argparse.Namespace, variant: str, device: torch.device) -> dict:
    """One image per step through SAM2ImagePredictor, as the popular fine-tuning scripts do."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    config = make_config(root, args, variant, "off")
    model = build_model(config, device).sam
    predictor = SAM2ImagePredictor(model)
    size = args.image_size
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    model.sam_mask_decoder.train(True)
    model.sam_prompt_encoder.train(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=4e-5)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    samples = load_split(
        DataSpec(source=root.as_uri(), format="coco", train="train/annotations.json"), root, "train", None
    ).samples
    rng = np.random.default_rng(0)

    def step(n: int) -> None:
        sample = samples[n % len(samples)]
        image = load_image(sample.image)
        masks = sample.masks(*image.shape[:2])[:OBJECTS]
        points = np.stack([np.argwhere(m)[rng.integers(len(np.argwhere(m)))][::-1] for m in masks])[:, None]
        with torch.autocast(device.type, dtype=torch.float16, enabled=cuda):
            predictor.set_image(image)
            _, coords, labels, _ = predictor._prep_prompts(
                points, np.ones((len(masks), 1)), box=None, mask_logits=None, normalize_coords=True
            )
            sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            high_res = [f[-1].unsqueeze(0) for f in predictor._features["high_res_feats"]]
            low_res, scores, _, _ = model.sam_mask_decoder(
                image_embeddings=predictor._features["image_embed"][-1].unsqueeze(0),
                image_pe=model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
                repeat_image=True,
                high_res_features=high_res,
            )
            prd = torch.sigmoid(predictor._transforms.postprocess_masks(low_res, predictor._orig_hw[-1])[:, 0])
            gt = torch.as_tensor(masks, device=device).float()
            seg_loss = (-gt * torch.log(prd + 1e-5) - (1 - gt) * torch.log(1 - prd + 1e-5)).mean()
            inter = (gt * (prd > 0.5)).sum((1, 2))
            iou = inter / (gt.sum((1, 2)) + (prd > 0.5).sum((1, 2)) - inter).clamp(min=1)
            loss = seg_loss + 0.05 * (scores[:, 0] - iou).abs().mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    seconds = timed(step, args, device)
    return {"images_per_second": len(seconds) / sum(seconds), "peak_gib": peak_memory(device)}


def kubetune(
    root: Path,
    args: argparse.Namespace,
    variant: str,
    device: torch.device,
    cache: str,
    full: bool = False,
    recompute: bool = False,
) -> dict:
    """The trainer's own step; with a cache, one untimed epoch fills it first."""
    config = make_config(root, args, variant, cache, full, recompute)
    ctx = init()
    module = build_model(config, device)
    if recompute:
        segmenter_for(config.model).checkpoint_encoder(module)
    pre = module.pre
    if cache != "off":
        module.cache = FeatureCache(cache, f"bench-{variant}", device, root / "cache")
    samples = load_split(
        DataSpec(source=root.as_uri(), format="coco", train="train/annotations.json"), root, "train", None
    ).samples
    loader = build_loader(samples, config, ctx, pre, module.cache, module.mask_side(args.image_size))
    trainer = build_trainer(module, loader, config, ctx, total_steps=10**6)
    trainer.model.train()
    warm = len(loader) if cache != "off" else 0
    for _ in range(warm):
        trainer.run_step()
    seconds = timed(lambda _: trainer.run_step(), args, device)
    batch = config.training.batch_size
    result = {"images_per_second": batch * len(seconds) / sum(seconds), "peak_gib": peak_memory(device), "batch": batch}
    if module.cache is not None:
        result["cache_hits"], result["cache_misses"] = module.cache.hits, module.cache.misses
    return result


def measure(mode: str, root: Path, args: argparse.Namespace, variant: str, device: torch.device) -> dict:
    if mode == "common":
        return common_recipe(root, args, variant, device)
    cache = {"cached": "memory", "cached-disk": "disk"}.get(mode, "off")
    return kubetune(root, args, variant, device, cache, full=mode.startswith("full"), recompute=mode == "full-ckpt")


def encoder_tflops(args: argparse.Namespace, variant: str, device: torch.device) -> dict:
    """The frozen image encoder's forward on one batch: FLOPs counted, then timed."""
    config = make_config(Path("/unused"), args, variant, "off")
    module = build_model(config, device)
    encoder = getattr(module.sam, module.encoder_name).eval()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad(), autocast(args.precision, device):
        counter = FlopCounterMode(display=False)
        with counter:
            encoder(images)
        flops = counter.get_total_flops()
        for _ in range(2):
            encoder(images)
        sync(device)
        start = time.perf_counter()
        repeats = max(args.steps, 3)
        for _ in range(repeats):
            encoder(images)
        sync(device)
    seconds = (time.perf_counter() - start) / repeats
    tflops = flops / seconds / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    return {"gflop_per_batch": flops / 1e9, "tflops": tflops, "bf16_peak_fraction": tflops / peak if peak else None}


def write(args: argparse.Namespace, hardware: str, results: list[dict]) -> None:
    meta = {
        "date": datetime.now(UTC).date().isoformat(),
        "hardware": hardware,
        "args": vars(args) | {"out": str(args.out)},
    }
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    partial.replace(args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sam2", choices=["sam2", "sam"])
    parser.add_argument("--variants", default=None, help=f"default: {DEFAULT_VARIANTS}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"a subset of {','.join(MODES)}")
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=64, help="synthetic training images")
    parser.add_argument("--batch", type=int, default=16, help="images per step for kubetune")
    parser.add_argument("--full-batch", type=int, default=4, help="images per step for the full fine-tune")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--precision", default=None, help="kubetune's precision (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    modes = [m for m in MODES if m in args.modes.split(",")]
    if unknown := set(args.modes.split(",")) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {','.join(MODES)}")
    if args.family != "sam2" and "common" in modes:
        parser.error("the common recipe is SAM2's (SAM2ImagePredictor); leave 'common' out of --modes for sam")
    args.variants = args.variants or DEFAULT_VARIANTS[args.family]
    device = init().device
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = write_coco_dataset(Path(tmp), train=args.images, val=1, size=args.image_size, seed=0)
        for variant in args.variants.split(","):
            row = {"variant": variant, "base": modes[0]}
            for mode in modes:
                row[mode] = measure(mode, root, args, variant, device)
            row["encoder"] = encoder_tflops(args, variant, device)
            base = row[modes[0]]["images_per_second"]
            for mode in modes[1:]:
                row[mode]["ratio"] = row[mode]["images_per_second"] / base
            results.append(row)
            if args.out:  # after every variant, so a run cut off still leaves what it measured
                write(args, hardware, results)
    print(
        f"\n{hardware}, {args.image_size} px, kubetune batch {args.batch} ({args.precision}), {args.steps} timed steps"
    )
    print(f"{'variant':28} {'mode':11} {'images/s':>9} {'ratio':>7} {'peak GiB':>9}   (ratios to {modes[0]})")
    for row in results:
        for mode in modes:
            r = row[mode]
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            print(f"{row['variant']:28} {mode:11} {r['images_per_second']:9.2f} {r.get('ratio', 1.0):7.2f} {peak:>9}")
        e = row["encoder"]
        fraction = f", {100 * e['bf16_peak_fraction']:.1f} % of bf16 peak" if e["bf16_peak_fraction"] else ""
        work = f"{e['gflop_per_batch']:.1f} GFLOP/batch, {e['tflops']:.3f} TFLOP/s"
        print(f"{row['variant']:28} encoder forward: {work}{fraction}")


if __name__ == "__main__":
    main()
