"""A small synthetic instance-segmentation dataset in COCO format: coloured shapes on noise.

Used by `kubetune demo` and the tests. Shapes overlap, so masks are the visible parts; the
top-most rectangles and triangles are written as polygons, everything else as RLE, so both COCO
encodings are exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

SHAPES = ("ellipse", "rectangle", "triangle")


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill) -> list[float] | None:
    x0, y0, x1, y1 = box
    if kind == "ellipse":
        draw.ellipse(box, fill=fill)
        return None
    if kind == "rectangle":
        draw.rectangle(box, fill=fill)
        return [x0, y0, x1 + 1, y0, x1 + 1, y1 + 1, x0, y1 + 1]
    points = [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    draw.polygon(points, fill=fill)
    return [v for p in points for v in p]


def make_image(rng: np.random.Generator, size: int, objects: int) -> tuple[Image.Image, list[dict]]:
    """One image and its annotations (segmentation + bbox + area), visible parts only."""
    base = rng.integers(40, 200, size=3)
    noise = rng.normal(0, 18, size=(size, size, 3))
    ramp = np.linspace(-30, 30, size)[None, :, None]
    pixels = np.clip(base + noise + ramp, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    layers: list[tuple[np.ndarray, list[float] | None]] = []
    for _ in range(objects):
        w, h = rng.integers(size // 6, size // 2, size=2)
        x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
        kind = SHAPES[rng.integers(len(SHAPES))]
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        polygon = _shape(draw, kind, box, color)
        canvas = Image.new("L", (size, size))
        _shape(ImageDraw.Draw(canvas), kind, box, 255)
        layers.append((np.asarray(canvas) > 0, polygon))
    annotations = []
    covered = np.zeros((size, size), bool)
    for depth, (mask, polygon) in enumerate(reversed(layers)):  # top-most first
        visible = mask & ~covered
        covered |= mask
        if visible.sum() < 16:
            continue
        if depth == 0 and polygon is not None:
            segmentation = [polygon]
        else:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            segmentation = {"size": rle["size"], "counts": rle["counts"].decode()}
        ys, xs = visible.nonzero()
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        annotations.append({"segmentation": segmentation, "bbox": bbox, "area": int(visible.sum()), "iscrowd": 0})
    return image, annotations


def write_coco_split(folder: Path, count: int, size: int, seed: int) -> Path:
    """`folder`/annotations.json plus `count` JPEG images; returns the annotation file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image, anns = make_image(rng, size, int(rng.integers(2, 5)))
        name = f"{index:05d}.jpg"
        image.save(folder / name, quality=92)
        images.append({"id": index + 1, "file_name": name, "width": size, "height": size})
        for ann in anns:
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": index + 1, "category_id": 1})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "shape"}]}
    path = folder / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def write_coco_dataset(root: Path, train: int = 24, val: int = 8, size: int = 160, seed: int = 0) -> Path:
    """root/train/annotations.json and root/val/annotations.json with their images."""
    write_coco_split(root / "train", train, size, seed)
    write_coco_split(root / "val", val, size, seed + 1000)
    return root
