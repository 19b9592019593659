"""VGG Image Annotator (VIA) projects and exports, as every family reads them: each image's file
name and, per region, its polygon (None for a shape kubetune does not read) and its attributes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer.datasets.files import load_json
from kubetune_trainer.errors import DataError


@dataclass(frozen=True)
class ViaRegion:
    polygon: list[float] | None  # x0, y0, x1, y1, ... in pixels
    attributes: dict[str, Any] = field(default_factory=dict)  # region_attributes (the class, for Detectron2)


@dataclass(frozen=True)
class ViaImage:
    filename: str
    regions: list[ViaRegion]


def read_via(path: Path) -> list[ViaImage]:
    """A VIA project (`_via_img_metadata`) or its export (the object of images itself)."""
    data = load_json(path)
    entries = data.get("_via_img_metadata", data) if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise DataError(f"{path} is not a VIA project/export (expected an object of images)")
    images = []
    for entry in entries.values():
        if not isinstance(entry, dict) or "filename" not in entry:
            raise DataError(f"{path}: VIA entries need a 'filename'")
        regions = entry.get("regions") or []
        regions = list(regions.values()) if isinstance(regions, dict) else regions
        parsed = [
            ViaRegion(via_polygon(r.get("shape_attributes") or {}), r.get("region_attributes") or {}) for r in regions
        ]
        images.append(ViaImage(entry["filename"], parsed))
    return images


def via_polygon(shape: dict) -> list[float] | None:
    if shape.get("name") in ("polygon", "polyline") and len(shape.get("all_points_x", [])) >= 3:
        xs, ys = shape["all_points_x"], shape["all_points_y"]
        return [float(v) + 0.5 for xy in zip(xs, ys, strict=False) for v in xy]
    if shape.get("name") == "rect":
        x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    return None
