"""Hugging Face datasets stored as Parquet (what `datasets` writes and the Hub serves): one row per
image, an image column and a mask column. A column holds an `Image` feature (a struct of `bytes`
and `path`), raw bytes, or a path relative to the Parquet file. Embedded bytes are written once
to a scratch folder, named by their content, so every family reads files as usual."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kubetune_trainer.datasets.files import ImageFinder
from kubetune_trainer.errors import DataError
from kubetune_trainer.paths import is_inside


@dataclass(frozen=True)
class Cell:
    """One image or mask of a row: bytes to write, or a path to find; `name` for reports."""

    name: str
    data: bytes | None
    path: str | None


@dataclass(frozen=True)
class Row:
    file: Path
    index: int
    image: Cell
    mask: Cell


def parquet_files(root: Path, split: str) -> list[Path]:
    """A split is a Parquet file, a folder of them, or a glob (data/train-*.parquet), inside root."""
    base = root / split
    if base.is_file():  # a literal name first, even one with glob characters in it
        found = [base]
    elif base.is_dir():
        found = sorted(base.rglob("*.parquet"))
    else:  # only the split is a pattern, never the folder the data sits in
        found = [Path(p) for p in sorted(glob.glob(os.path.join(glob.escape(str(root)), split)))]
    found = [p for p in found if is_inside(root, p)]
    if not found:
        raise DataError(f"no Parquet file at {base}")
    return found


def rows(path: Path, image_column: str, mask_column: str) -> Iterator[Row]:
    import pyarrow.parquet as pq  # read in batches: a split may not fit in memory at once

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DataError(f"{path} is not a readable Parquet file: {exc}") from exc
    columns = parquet.schema_arrow.names
    for what, column in (("data.imageColumn", image_column), ("data.maskColumn", mask_column)):
        if column not in columns:
            raise DataError(f"{path} has no column {column!r} ({what}); its columns are {columns}")
    index = 0
    for batch in parquet.iter_batches(batch_size=64, columns=[image_column, mask_column]):
        for image, mask in zip(
            batch.column(image_column).to_pylist(), batch.column(mask_column).to_pylist(), strict=True
        ):
            yield Row(path, index, _cell(image, path, index, "image"), _cell(mask, path, index, "mask"))
            index += 1


def _cell(value: object, file: Path, index: int, what: str) -> Cell:
    fallback = f"{file.name} row {index} {what}"
    if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        data, path = value.get("bytes"), value.get("path")
        name = f"{file.name} row {index} ({path})" if path else fallback
        return Cell(name, data or None, str(path) if path and not data else None)
    if isinstance(value, bytes):
        return Cell(fallback, value, None)
    if isinstance(value, str):
        return Cell(f"{file.name} row {index} ({value})", None, value)
    return Cell(fallback, None, None)


def materialize(cell: Cell, finder: ImageFinder, scratch: Path) -> Path | None:
    """The cell as a file: its bytes written under `scratch` (named by their sha256), or the file
    its path names inside the dataset (OutsideRoot if it leads out). None: nothing there."""
    if cell.data is not None:
        digest = hashlib.sha256(cell.data).hexdigest()
        suffix = ".png" if cell.data[:4] == b"\x89PNG" else ".jpg" if cell.data[:2] == b"\xff\xd8" else ".img"
        out = scratch / digest[:2] / f"{digest}{suffix}"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}")
            tmp.write_bytes(cell.data)
            os.replace(tmp, out)  # ranks that write the same image race harmlessly
        return out
    if cell.path is None:
        return None
    return finder.find(cell.path)[0]
