"""Instance masks decoded on demand, [K,H,W] bool for an image of H×W: COCO polygons and RLE,
instance-id PNGs (mask folders, LabPics, VOC) and Datumaro objects made of several parts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


@dataclass(frozen=True)
class PolygonMasks:
    """COCO-style segmentations: a polygon list, or an RLE dict (compressed or not), per object."""

    segmentations: tuple

    def __call__(self, height: int, width: int) -> np.ndarray:
        out = []
        for seg in self.segmentations:
            if isinstance(seg, dict):
                rle = seg if isinstance(seg["counts"], str | bytes) else mask_utils.frPyObjects(seg, height, width)
            else:
                rle = mask_utils.merge(mask_utils.frPyObjects([p for p in seg if len(p) >= 6], height, width))
            if list(rle["size"]) != [height, width]:
                raise ValueError(f"an RLE mask is {rle['size'][1]}x{rle['size'][0]}, its image is {width}x{height}")
            out.append(mask_utils.decode(rle).astype(bool))
        return np.stack(out) if out else np.zeros((0, height, width), bool)


@dataclass(frozen=True)
class InstancePng:
    """A PNG whose pixel values are instance ids (0 = background); `style` says how to read it."""

    path: Path
    style: str = "ids"  # ids | labpics | voc

    def __call__(self, height: int, width: int) -> np.ndarray:
        with Image.open(self.path) as im:
            if self.style == "labpics":
                # LabPicsV1 Instance PNGs: material instances in blue, vessels in red.
                rgb = np.asarray(im.convert("RGB"))
                ids = rgb[..., 2].astype(np.int32)
                ids[ids == 0] = rgb[..., 0][ids == 0].astype(np.int32) * (int(ids.max()) + 1)
            elif im.mode in ("P", "L", "I", "I;16"):
                ids = np.asarray(im).astype(np.int32)
            else:
                ids = np.asarray(im.convert("L")).astype(np.int32)
        if ids.shape != (height, width):
            raise ValueError(f"mask {self.path.name} is {ids.shape[1]}x{ids.shape[0]}, image is {width}x{height}")
        values = [v for v in np.unique(ids) if v != 0 and not (self.style == "voc" and v == 255)]
        return np.stack([ids == v for v in values]) if values else np.zeros((0, height, width), bool)


@dataclass(frozen=True)
class DatumaroMasks:
    """One object per entry: the union of its polygons ([x, y, ...]) and RLE masks."""

    objects: tuple

    def __call__(self, height: int, width: int) -> np.ndarray:
        out = []
        for parts in self.objects:
            polygons = tuple(p for p in parts if not isinstance(p, dict))
            masks = [PolygonMasks((p,))(height, width)[0] for p in parts if isinstance(p, dict)]
            if polygons:
                masks.append(PolygonMasks((polygons,))(height, width)[0])
            out.append(np.logical_or.reduce(masks))
        return np.stack(out) if out else np.zeros((0, height, width), bool)


MaskSource = Callable[[int, int], np.ndarray]
