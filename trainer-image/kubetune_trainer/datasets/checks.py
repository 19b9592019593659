"""Decode every sample of a split once, before any GPU time is spent: keep what trains, skip and
count the rest (an unreadable image or mask, an empty mask, an image without objects), and say
so in one summary (`kubetune validate --data` prints it; the trainer logs it)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from PIL import Image, UnidentifiedImageError

from kubetune_trainer.config import DataSpec
from kubetune_trainer.datasets.files import load_image
from kubetune_trainer.datasets.masks import Subset
from kubetune_trainer.datasets.readers import Sample, SplitReport, Which, read_split
from kubetune_trainer.errors import DataError

log = structlog.get_logger(__name__)
UNREADABLE = (
    OSError, UnidentifiedImageError, ValueError, SyntaxError, TypeError, KeyError, IndexError, MemoryError,
    Image.DecompressionBombError, Image.DecompressionBombWarning,
)  # fmt: skip  # whatever a damaged file makes Pillow or a decoder raise: skipped, never fatal one by one


@dataclass
class SplitSummary:
    split: str
    where: str
    images: int = 0
    objects: int = 0
    classes: list[str] = field(default_factory=list)
    smallest: tuple[int, int] | None = None  # (width, height) of the image with the fewest pixels
    largest: tuple[int, int] | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        sizes = {"smallest": list(self.smallest), "largest": list(self.largest)} if self.smallest else None
        return {
            "images": self.images,
            "objects": self.objects,
            "classes": self.classes,
            "imageSizes": sizes,
            "skipped": self.skipped,
            "examples": self.examples,
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        out = [f"{self.split}: {self.where}", f"  images: {self.images}", f"  objects: {self.objects}"]
        out.append(f"  classes ({len(self.classes)}): {', '.join(self.classes) or '-'}")
        if self.smallest and self.largest:
            (w0, h0), (w1, h1) = self.smallest, self.largest
            out.append(f"  image sizes: {w0}x{h0} to {w1}x{h1}")
        for reason, count in self.notes.items():
            out.append(f"  note: {reason}: {count}")
        for reason, count in self.skipped.items():
            out.append(f"  skipped: {reason}: {count}")
            out += [f"    e.g. {name}" for name in self.examples.get(reason, [])]
        return out


@dataclass
class SplitData:
    samples: list[Sample]
    classes: list[str]  # what category indices mean: declared by the format, else the names seen
    summary: SplitSummary


@dataclass
class _Look:
    sample: Sample | None
    size: tuple[int, int] | None = None  # (height, width)
    names: list[str] = field(default_factory=list)
    empty: int = 0
    problem: tuple[str, str] | None = None  # (reason, example)


def _look(sample: Sample, keep_empty: bool) -> _Look:
    try:
        height, width = load_image(sample.image, sample.exif).shape[:2]  # a full decode finds truncation
        masks, names = sample.masks.decode(height, width)  # one decode: VOC and PNG masks are not cheap
    except UNREADABLE as exc:
        return _Look(None, problem=("unreadable image or mask", f"{sample.image.name}: {exc}"))
    filled = masks.reshape(masks.shape[0], -1).any(axis=1) if masks.size else np.zeros(masks.shape[0], bool)
    keep = tuple(int(i) for i in np.flatnonzero(filled))
    if not keep and not keep_empty:
        return _Look(None, empty=len(filled), problem=("image without annotations", sample.image.name))
    source = sample.masks if len(keep) == len(filled) else Subset(sample.masks, keep)
    kept = Sample(sample.image, source, sample.exif)
    return _Look(kept, (height, width), [names[i] for i in keep], empty=len(filled) - len(keep))


def check_split(report: SplitReport, keep_empty: bool = False, workers: int = 8) -> SplitData:
    """The usable samples of a split (objects with empty masks dropped) and its summary.
    `keep_empty` keeps images without objects (Detectron2 evaluates on them)."""
    with ThreadPoolExecutor(workers) as pool:  # decoding is mostly I/O and C code
        looks = list(pool.map(lambda s: _look(s, keep_empty), report.samples))
    for look in looks:
        if look.empty:
            report.skip("empty mask (object)", look.sample.image.name if look.sample else "", look.empty)
        if look.problem:
            report.skip(*look.problem)
    usable = [look for look in looks if look.sample is not None]
    seen = Counter(name for look in usable for name in look.names)
    classes = report.classes or sorted(seen)
    summary = SplitSummary(
        split=report.split,
        where=report.where,
        images=len(usable),
        objects=sum(seen.values()),
        classes=[c for c in classes if c in seen] + sorted(set(seen) - set(classes)),
        skipped=dict(report.skipped),
        examples={k: v for k, v in report.examples.items() if k in report.skipped},
        notes=dict(report.notes),
    )
    sizes = [look.size for look in usable if look.size]
    if sizes:
        small, large = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
        summary.smallest, summary.largest = (small[1], small[0]), (large[1], large[0])
    return SplitData([look.sample for look in usable], classes, summary)  # type: ignore[misc]


def require_usable(data: SplitData) -> SplitData:
    """A split with no usable sample is fatal; the error names the split, files and reasons."""
    s = data.summary
    if not data.samples or (s.objects == 0 and not s.images):
        detail = "\n".join(s.lines()[3:]) or "  (nothing found)"
        raise DataError(f"data.{s.split}: no usable sample in {s.where}:\n{detail}")
    return data


def log_summary(data: SplitData) -> None:
    s = data.summary
    log.info("dataset", split=s.split, images=s.images, objects=s.objects, classes=len(s.classes), notes=s.notes)
    if s.skipped:
        log.warning("skipped samples", split=s.split, **{r: n for r, n in s.skipped.items()}, examples=s.examples)


def load_split(data: DataSpec, root: Path, which: Which, scratch: Path | None, keep_empty: bool = False) -> SplitData:
    """Read, decode and check one split as the trainer uses it; logs its summary."""
    split = require_usable(check_split(read_split(data, root, which, scratch), keep_empty))
    log_summary(split)
    return split
