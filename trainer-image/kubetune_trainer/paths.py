"""Paths built from names nobody vetted: object keys listed from a bucket, file names inside
annotation files, entries of image sets. Each must stay inside its root: no absolute path, no
`..` that climbs out, no NUL byte, and no symlink that leads out. Imports nothing of kubetune's,
so every layer can use it."""

from __future__ import annotations

import os
from pathlib import Path


class OutsideRoot(ValueError):
    """A name that would reach outside its root; the message names it."""


def checked_key(key: str) -> str:
    """An object key that is a plain relative path (what staging writes under the cache): no
    leading `/`, no empty (`a//b`), `.` or `..` parts, no NUL byte."""
    parts = key.split("/")
    if not key or "\x00" in key or any(part in ("", ".", "..") for part in parts):
        raise OutsideRoot(f"object key {key!r} is not a plain relative path (no '/', '//', '.', '..' parts)")
    return key


def inside(root: Path, name: str | os.PathLike[str]) -> Path:
    """`root / name`, refused unless it stays under `root` once `..` and symlinks are resolved."""
    text = os.fspath(name)
    if "\x00" in text:
        raise OutsideRoot(f"{text!r} holds a NUL byte")
    if os.path.isabs(text):
        raise OutsideRoot(f"{text!r} is an absolute path; it must be relative to {root}")
    path = root / text
    if not is_inside(root, path):
        raise OutsideRoot(f"{text!r} leads outside {root}")
    return path


def is_inside(root: Path, path: Path) -> bool:
    """Whether `path`, symlinks resolved, is `root` or below it."""
    return path.resolve().is_relative_to(root.resolve())
