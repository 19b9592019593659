"""VGG Image Annotator (VIA) projects and exports, 1.x (regions as an object) and 2.x (a list),
as every family reads them: each image's file name and, per region, its outline as a polygon
(polygon, polyline, rect, circle, ellipse) or the reason it has none, and its class."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_trainer.datasets.files import load_json
from kubetune_trainer.errors import DataError

CLASS_ATTRIBUTES = ("class", "label", "category", "name", "type", "class_name", "classname", "object")
DEFAULT_CLASS = "object"
CURVE_POINTS = 64  # vertices of a circle or ellipse outline


@dataclass(frozen=True)
class ViaRegion:
    polygon: list[float] | None  # x0, y0, x1, y1, ... in pixels; None: see `problem`
    attributes: dict[str, Any] = field(default_factory=dict)  # region_attributes
    problem: str = ""  # why there is no polygon


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
    for key, entry in entries.items():
        if not isinstance(entry, dict) or "filename" not in entry:
            raise DataError(f"{path}: VIA entry {key!r} needs a 'filename'")
        regions = entry.get("regions") or []
        regions = list(regions.values()) if isinstance(regions, dict) else regions
        parsed = []
        for r in regions:
            r = r if isinstance(r, dict) else {}
            polygon, problem = via_polygon(r.get("shape_attributes") or {})
            parsed.append(ViaRegion(polygon, r.get("region_attributes") or {}, problem))
        images.append(ViaImage(str(entry["filename"]), parsed))
    return images


def via_polygon(shape: dict) -> tuple[list[float] | None, str]:
    """(the region's outline in pixel coordinates, or None and the reason)."""
    name = shape.get("name")
    try:
        if name in ("polygon", "polyline"):
            xs, ys = shape.get("all_points_x") or [], shape.get("all_points_y") or []
            if len(xs) < 3 or len(xs) != len(ys):
                return None, "polygon with fewer than 3 points"
            # VIA's coordinates are pixel corners; +0.5 as the Detectron2 balloon tutorial does.
            return [float(v) + 0.5 for xy in zip(xs, ys, strict=True) for v in xy], ""
        if name == "rect":
            x, y, w, h = (float(shape[k]) for k in ("x", "y", "width", "height"))
            return [x, y, x + w, y, x + w, y + h, x, y + h], ""
        if name in ("circle", "ellipse"):
            cx, cy = float(shape["cx"]), float(shape["cy"])
            rx, ry = (float(shape["r"]),) * 2 if name == "circle" else (float(shape["rx"]), float(shape["ry"]))
            return ellipse(cx, cy, rx, ry, float(shape.get("theta") or 0.0)), ""
    except (KeyError, TypeError, ValueError):
        return None, f"VIA {name} region without its coordinates"
    if name == "point":
        return None, "VIA point region (a point has no area to mask)"
    return None, f"VIA {name or 'unnamed'} region (not a shape kubetune reads)"


def ellipse(cx: float, cy: float, rx: float, ry: float, theta: float = 0.0) -> list[float]:
    """An ellipse's outline (rotated by theta radians, as VIA 2 stores it) as a polygon."""
    out = []
    cos, sin = math.cos(theta), math.sin(theta)
    for i in range(CURVE_POINTS):
        a = 2 * math.pi * i / CURVE_POINTS
        x, y = rx * math.cos(a), ry * math.sin(a)
        out += [cx + x * cos - y * sin, cy + x * sin + y * cos]
    return out


def via_class(attributes: Any, attribute: str | None = None) -> str | None:
    """A region's class: the attribute named by data.classAttribute, else a class-like attribute
    (or the only one), as a string or the one checked box of a checkbox. None when there are
    several attributes and none says which holds the class."""
    if not isinstance(attributes, dict) or not attributes:
        return DEFAULT_CLASS
    if attribute is not None:
        names = [attribute]
    else:
        lowered = {k.lower(): k for k in attributes}
        names = [lowered[k] for k in CLASS_ATTRIBUTES if k in lowered]
        if not names:
            if len(attributes) > 1:
                return None
            names = list(attributes)
    for name in names:
        value = attributes.get(name)
        if isinstance(value, str | int) and str(value).strip():
            return str(value).strip()
        if isinstance(value, dict):
            checked = [k for k, on in value.items() if on]
            if len(checked) == 1:
                return checked[0]
    return DEFAULT_CLASS
