"""Before/after pictures of a promptable segmenter on a fixed set of validation images.

Each image becomes one row of panels at its original size (scaled for display): the image, the
ground truth, the prompts, the base model's masks and the fine-tuned model's, each object's IoU
written on its mask. The base model's masks are predicted at the baseline evaluation and kept (as
COCO RLE, in checkpoints too), so a resumed run still draws the "before" column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from torch import nn

from kubetune_trainer.datasets.files import load_image
from kubetune_trainer.datasets.readers import Sample
from kubetune_trainer.promptable.data import EVAL_EPOCH, PromptedMasks, collate
from kubetune_trainer.promptable.evaluation import CHUNK_PIXELS, original_size_logits
from kubetune_trainer.promptable.losses import kept_logits
from kubetune_trainer.reporting.publisher import png
from kubetune_trainer.training import distributed

PANEL = 320  # longest side of one panel, in pixels
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)  # fmt: skip
TITLES = ("image", "ground truth", "prompts", "base model", "fine-tuned")


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def pick(count: int, size: int) -> list[int]:
    """`count` validation indices spread evenly over a split of `size` (all of it when smaller)."""
    if count >= size:
        return list(range(size))
    return sorted({round(i * (size - 1) / max(count - 1, 1)) for i in range(count)})


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    union = np.logical_or(pred, target).sum()
    return float(np.logical_and(pred, target).sum() / union) if union else 0.0


def encode(masks: np.ndarray) -> list[dict]:
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


def decode(rles: list[dict], height: int, width: int) -> np.ndarray:
    if not rles:
        return np.zeros((0, height, width), bool)
    coded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    return mask_utils.decode(coded).transpose(2, 0, 1).astype(bool)


@dataclass
class Shown:
    """One gallery image: what it shows and what the models made of it, at its original size."""

    index: int
    image: np.ndarray  # [H,W,3] uint8
    targets: np.ndarray  # [K,H,W] bool
    coords: np.ndarray  # [K,P,2] prompt points in original pixels
    labels: np.ndarray  # [K,P] SAM's labels: 1/0 clicks, 2/3 box corners


class Gallery:
    """Rank 0 predicts and draws the gallery images at every evaluation."""

    def __init__(self, samples: list[Sample], dataset: PromptedMasks, count: int) -> None:
        self.samples = samples
        self.dataset = dataset
        self.indices = pick(count, len(samples))
        self.base: dict[int, list[dict]] = {}  # index -> the base model's masks (RLE)

    def _item(self, index: int) -> tuple[dict, Shown]:
        item = self.dataset[(EVAL_EPOCH, index)]
        sample = self.samples[index]
        image = load_image(sample.image, sample.exif)
        height, width = image.shape[:2]
        extent = item["extent"]
        scale = np.array([width / extent[1], height / extent[0]])
        coords = item["coords"].numpy() * scale
        return item, Shown(index, image, item["original"].numpy(), coords, item["labels"].numpy())

    @torch.no_grad()
    def predict(self, module: nn.Module, multimask: bool, reduction: str, precision: str, device: torch.device):
        """Per gallery image its Shown and the kept masks at its original size."""
        was_training = module.training
        module.eval()
        out = []
        for index in self.indices:
            item, shown = self._item(index)
            size = shown.image.shape[:2]
            if not len(item["masks"]):  # nothing to prompt
                out.append((shown, np.zeros((0, *size), bool)))
                continue
            batch = collate([item]).to(device)
            with distributed.autocast(precision, device):
                preds = module(batch, multimask)
            logits = kept_logits(preds, reduction)
            step = max(1, CHUNK_PIXELS // (size[0] * size[1]))  # a large image, a few objects at a time
            masks = [
                (original_size_logits(logits[i : i + step], self.dataset.pre.size, item["extent"], size) > 0).cpu()
                for i in range(0, len(logits), step)
            ]
            out.append((shown, torch.cat(masks).numpy()))
        module.train(was_training)
        return out

    def draw(self, module: nn.Module, multimask: bool, reduction: str, precision: str, device: torch.device,
             baseline: bool) -> list[tuple[str, bytes]]:  # fmt: skip
        """PNG rows named `NN.png`; at the baseline the base model's masks are kept for later."""
        rows = []
        for shown, masks in self.predict(module, multimask, reduction, precision, device):
            height, width = shown.image.shape[:2]
            if baseline:
                self.base[shown.index] = encode(masks)
            # A run resumed from a checkpoint without the base model's masks has none to show.
            base = decode(self.base[shown.index], height, width) if shown.index in self.base else None
            tuned = None if baseline else masks
            rows.append((f"{shown.index:05d}.png", png(draw_row(shown, base, tuned))))
        return rows

    def state_dict(self) -> dict:
        return {"gallery_base": {str(k): v for k, v in self.base.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.base = {int(k): v for k, v in (state.get("gallery_base") or {}).items()}


def _scaled(image: Image.Image) -> Image.Image:
    factor = PANEL / max(image.size)
    return image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BILINEAR)


def _overlay(image: np.ndarray, masks: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image at panel size with each mask tinted in its object's colour and outlined, so a
    mask stays visible whatever the colours of the image under it."""
    panel = _scaled(Image.fromarray(image))
    out = np.asarray(panel, np.float32).copy()
    for k, mask in enumerate(masks):
        small = np.asarray(Image.fromarray(mask).resize(panel.size, Image.NEAREST))
        color = np.array(PALETTE[k % len(PALETTE)], np.float32)
        out[small] = (1 - alpha) * out[small] + alpha * color
        inner = small.copy()
        inner[1:] &= small[:-1]
        inner[:-1] &= small[1:]
        inner[:, 1:] &= small[:, :-1]
        inner[:, :-1] &= small[:, 1:]
        out[small & ~inner] = color  # the outline
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _label_at(draw: ImageDraw.ImageDraw, mask: np.ndarray, text: str, factor: float, fallback: tuple) -> None:
    ys, xs = np.nonzero(mask)
    x, y = (xs.min(), ys.min()) if len(xs) else fallback
    x, y = x * factor, y * factor
    font = _font(13)
    box = draw.textbbox((x, y), text, font=font)
    draw.rectangle(box, fill=(0, 0, 0))
    draw.text((x, y), text, fill=(255, 255, 255), font=font)


def _mask_panel(shown: Shown, masks: np.ndarray | None, missing: str) -> Image.Image:
    if masks is None:
        panel = _scaled(Image.fromarray(shown.image // 3))
        ImageDraw.Draw(panel).text((8, panel.height // 2), missing, fill=(255, 255, 255), font=_font(16))
        return panel
    panel = _overlay(shown.image, masks)
    draw = ImageDraw.Draw(panel)
    factor = panel.width / shown.image.shape[1]
    for k, (pred, target) in enumerate(zip(masks, shown.targets, strict=True)):
        corner = tuple(shown.coords[k].min(0))
        _label_at(draw, pred if pred.any() else target, f"{iou(pred, target):.2f}", factor, corner)
    if len(masks):
        mean = np.mean([iou(p, t) for p, t in zip(masks, shown.targets, strict=True)])
        draw.text(
            (4, panel.height - 20),
            f"mIoU {mean:.2f}",
            fill=(255, 255, 255),
            font=_font(15),
            stroke_width=2,
            stroke_fill=0,
        )
    return panel


def _prompt_panel(shown: Shown) -> Image.Image:
    panel = _scaled(Image.fromarray(shown.image))
    draw = ImageDraw.Draw(panel)
    factor = panel.width / shown.image.shape[1]
    for k, (coords, labels) in enumerate(zip(shown.coords, shown.labels, strict=True)):
        color = PALETTE[k % len(PALETTE)]
        corners = coords[np.isin(labels, (2, 3))] * factor
        if len(corners) == 2:
            draw.rectangle([*corners[0], *corners[1]], outline=color, width=2)
        for (x, y), label in zip(coords * factor, labels, strict=True):
            if label in (0, 1):
                fill = (0, 255, 0) if label == 1 else (255, 0, 0)
                draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=fill, outline=color, width=2)
    return panel


def draw_row(shown: Shown, base: np.ndarray | None, tuned: np.ndarray | None) -> Image.Image:
    """image | ground truth | prompts | base model | fine-tuned, titled, side by side."""
    panels = [
        _scaled(Image.fromarray(shown.image)),
        _overlay(shown.image, shown.targets),
        _prompt_panel(shown),
        _mask_panel(shown, base, "(not drawn before training)"),
        _mask_panel(shown, tuned, "(drawn after training)"),
    ]
    gap, title_h = 6, 22
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    row = Image.new("RGB", (width, max(p.height for p in panels) + title_h), (255, 255, 255))
    draw = ImageDraw.Draw(row)
    x = 0
    for panel, title in zip(panels, TITLES, strict=True):
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=_font(15))
        row.paste(panel, (x, title_h))
        x += panel.width + gap
    return row
