"""Instance masks decoded on demand for an image of H×W: [K,H,W] bool, each object's class name,
and each object as Detectron2 takes it (polygons, or compressed RLE). Sources: COCO polygons and
RLE, instance-id PNGs (mask folders, LabPics, Hugging Face mask images), VOC's palette or RGB
PNGs, Datumaro objects made of several parts. Also: turning annotations by an EXIF orientation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from kubetune_trainer.datasets import voc

DEFAULT_CLASS = "object"
Segment = list[list[float]] | dict  # polygons ([x0, y0, x1, y1, ...] each) or compressed RLE


class MaskSource(Protocol):
    def __call__(self, height: int, width: int) -> np.ndarray: ...

    def decode(self, height: int, width: int) -> tuple[np.ndarray, list[str]]:
        """The masks and their class names from one decode (what the data check needs)."""
        ...

    def labels(self, height: int, width: int) -> list[str]: ...

    def segments(self, height: int, width: int) -> list[Segment]: ...


def encode(mask: np.ndarray) -> dict:
    """Compressed RLE with text counts (JSON- and Detectron2-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def polygon_parts(segmentation: list) -> list[list[float]]:
    """The polygons of a COCO segmentation that have an area: 3 points or more, x and y paired."""
    return [
        [float(v) for v in p]
        for p in segmentation
        if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(isinstance(v, int | float) for v in p)
    ]


def compressed(rle: dict, height: int, width: int) -> dict:
    """An RLE dict (COCO's compressed string, or the uncompressed counts list that CVAT and
    Datumaro write for crowd and brush masks) as compressed RLE, checked against the image size."""
    if list(rle.get("size", ())) != [height, width]:
        size = rle.get("size") or ["?", "?"]
        raise ValueError(f"an RLE mask is {size[1]}x{size[0]}, its image is {width}x{height}")
    counts = rle["counts"]
    if isinstance(counts, list):
        return mask_utils.frPyObjects(rle, height, width)
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


class DecodedMasks:
    """Sources that decode to bitmaps first: objects go to Detectron2 as compressed RLE."""

    names: tuple[str, ...] = ()

    def __call__(self, height: int, width: int) -> np.ndarray:
        raise NotImplementedError

    def decode(self, height: int, width: int) -> tuple[np.ndarray, list[str]]:
        masks = self(height, width)
        count = masks.shape[0]
        return masks, list(self.names) if len(self.names) == count else [DEFAULT_CLASS] * count

    def labels(self, height: int, width: int) -> list[str]:
        return self.decode(height, width)[1]

    def segments(self, height: int, width: int) -> list[Segment]:
        return [encode(m) for m in self(height, width)]


@dataclass(frozen=True)
class PolygonMasks:
    """COCO-style objects: per object a list of polygons, or an RLE dict (compressed or not)."""

    segmentations: tuple
    names: tuple[str, ...] = ()

    def __call__(self, height: int, width: int) -> np.ndarray:
        out = [mask_utils.decode(self._rle(seg, height, width)).astype(bool) for seg in self.segmentations]
        return np.stack(out) if out else np.zeros((0, height, width), bool)

    @staticmethod
    def _rle(seg: Segment, height: int, width: int) -> dict:
        if isinstance(seg, dict):
            return compressed(seg, height, width)
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))

    def decode(self, height: int, width: int) -> tuple[np.ndarray, list[str]]:
        return self(height, width), self.labels(height, width)

    def labels(self, height: int, width: int) -> list[str]:
        return list(self.names) if self.names else [DEFAULT_CLASS] * len(self.segmentations)

    def segments(self, height: int, width: int) -> list[Segment]:
        out: list[Segment] = []
        for seg in self.segmentations:
            if isinstance(seg, dict):
                rle = compressed(seg, height, width)
                out.append({"size": rle["size"], "counts": rle["counts"].decode("ascii")})
            else:
                out.append(seg)
        return out


@dataclass(frozen=True)
class InstancePng(DecodedMasks):
    """A PNG whose pixel values are instance ids (0 = background); `style` says how to read it:
    ids (grey or palette values), labpics (LabPicsV1: vessels in red, materials in blue) or
    binary (any non-zero pixel is the one object, as many Hugging Face mask columns hold)."""

    path: Path
    style: str = "ids"  # ids | labpics

    def __call__(self, height: int, width: int) -> np.ndarray:
        with Image.open(self.path) as im:
            if self.style == "labpics":
                rgb = np.asarray(im.convert("RGB"))
                ids = rgb[..., 2].astype(np.int32)
                ids[ids == 0] = rgb[..., 0][ids == 0].astype(np.int32) * (int(ids.max()) + 1)
            elif im.mode in ("P", "L", "I", "I;16", "1"):
                ids = np.asarray(im).astype(np.int32)
            else:  # RGB ids: every distinct colour is one instance
                rgb = np.asarray(im.convert("RGB")).astype(np.int32)
                ids = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        if ids.shape != (height, width):
            raise ValueError(f"mask {self.path.name} is {ids.shape[1]}x{ids.shape[0]}, image is {width}x{height}")
        values = [v for v in np.unique(ids) if v != 0]
        return np.stack([ids == v for v in values]) if values else np.zeros((0, height, width), bool)


@dataclass(frozen=True)
class VocMasks(DecodedMasks):
    """VOC masks, palette or RGB (CVAT and Datumaro paint them): SegmentationObject for one object
    per instance, its class the commonest under it in SegmentationClass (when there); or, with
    `objects` None, SegmentationClass alone, one object per class. Void (255) is never an object."""

    objects: Path | None
    classes: Path | None
    labelmap: voc.Labelmap

    def _read(self, path: Path, colours: np.ndarray, height: int, width: int) -> np.ndarray:
        indices = voc.indices(path, colours)
        if indices.shape != (height, width):
            raise ValueError(f"mask {path.name} is {indices.shape[1]}x{indices.shape[0]}, image is {width}x{height}")
        return indices

    def _decode(self, height: int, width: int) -> tuple[list[np.ndarray], list[str]]:
        classes = self._read(self.classes, self.labelmap.colours, height, width) if self.classes else None
        if self.objects is None:
            assert classes is not None
            values = [v for v in np.unique(classes) if v in self.labelmap.names]
            return [classes == v for v in values], [self.labelmap.names[v] for v in values]
        ids = self._read(self.objects, voc.COLORMAP, height, width)
        masks, names = [], []
        for value in np.unique(ids):
            if value in (0, voc.VOID):
                continue
            mask = ids == value
            masks.append(mask)
            under = classes[mask] if classes is not None else np.zeros(0, np.int64)
            under = under[np.isin(under, list(self.labelmap.names))]
            names.append(self.labelmap.names[int(np.bincount(under).argmax())] if under.size else DEFAULT_CLASS)
        return masks, names

    def decode(self, height: int, width: int) -> tuple[np.ndarray, list[str]]:
        masks, names = self._decode(height, width)
        return (np.stack(masks) if masks else np.zeros((0, height, width), bool)), names

    def __call__(self, height: int, width: int) -> np.ndarray:
        return self.decode(height, width)[0]


@dataclass(frozen=True)
class DatumaroMasks(DecodedMasks):
    """One object per entry: the union of its polygons ([x, y, ...]) and RLE masks."""

    objects: tuple
    names: tuple[str, ...] = ()

    def __call__(self, height: int, width: int) -> np.ndarray:
        out = []
        for parts in self.objects:
            polygons = [p for p in parts if not isinstance(p, dict)]
            masks = [PolygonMasks((p,))(height, width)[0] for p in parts if isinstance(p, dict)]
            if polygons:
                masks.append(PolygonMasks((polygons,))(height, width)[0])
            out.append(np.logical_or.reduce(masks))
        return np.stack(out) if out else np.zeros((0, height, width), bool)


@dataclass(frozen=True)
class Subset:
    """Some objects of a source (those whose masks are not empty)."""

    source: MaskSource
    keep: tuple[int, ...]

    def __call__(self, height: int, width: int) -> np.ndarray:
        return self.source(height, width)[list(self.keep)]

    def decode(self, height: int, width: int) -> tuple[np.ndarray, list[str]]:
        masks, names = self.source.decode(height, width)
        return masks[list(self.keep)], [names[i] for i in self.keep]

    def labels(self, height: int, width: int) -> list[str]:
        names = self.source.labels(height, width)
        return [names[i] for i in self.keep]

    def segments(self, height: int, width: int) -> list[Segment]:
        segments = self.source.segments(height, width)
        return [segments[i] for i in self.keep]


# EXIF orientation -> the PIL transpose that shows the stored image upright (as ImageOps.exif_transpose).
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def turn_polygon(points: list[float], orientation: int, height: int, width: int) -> list[float]:
    """A polygon on the stored image (height×width) as it lies on the image EXIF shows."""
    xs, ys = np.asarray(points[0::2], float), np.asarray(points[1::2], float)
    w, h = float(width), float(height)
    x, y = {
        1: (xs, ys),
        2: (w - xs, ys),
        3: (w - xs, h - ys),
        4: (xs, h - ys),
        5: (ys, xs),
        6: (h - ys, xs),
        7: (h - ys, w - xs),
        8: (ys, w - xs),
    }[orientation]
    return [float(v) for xy in zip(x, y, strict=True) for v in xy]


def turn_mask(mask: np.ndarray, orientation: int) -> np.ndarray:
    """A [H,W] bool mask on the stored image as it lies on the image EXIF shows."""
    if orientation == 1:
        return mask
    turned = Image.fromarray(mask.astype(np.uint8)).transpose(EXIF_TRANSPOSE[orientation])
    return np.asarray(turned).astype(bool)
