"""Image-encoder features of a frozen encoder, computed once and reused every epoch.

A frozen encoder maps the same input to the same features, so training only needs them once per
(image content, flip). Entries are keyed by the image file's content hash and the flip; the cache
folder (or dict) is named by a fingerprint of everything else that changes the features: the
encoder's weights, the preprocessing (size, resize mode, mean, std) and the dtype they are kept
in. Change any of them and the old entries are simply never looked up again.

`memory` keeps entries on the training device; `disk` writes one safetensors file per entry to
the node-local cache folder, shared by the node's ranks and kept across restarts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import astuple
from pathlib import Path

import structlog
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import Preprocess

log = structlog.get_logger(__name__)


def fingerprint(encoder: nn.Module, pre: Preprocess, precision: str) -> str:
    """What, besides the image, decides the features: weights, preprocessing, stored dtype."""
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())  # no byte copy
    digest.update(repr((astuple(pre), precision)).encode())
    return digest.hexdigest()


class DiskEntries:
    """The disk cache's files: one safetensors file per key, written atomically. Plain paths, so
    DataLoader workers read entries too and skip decoding the images they stand for."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, key: str, device: str = "cpu") -> list[torch.Tensor] | None:
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            tensors = load_file(path, device=device)
        except Exception:  # damaged on disk: recompute it
            log.warning("unreadable feature cache entry; recomputing", path=str(path))
            return None
        return [tensors[str(i)] for i in range(len(tensors))]

    def write(self, key: str, features: list[torch.Tensor]) -> None:
        path = self.folder / f"{key}.safetensors"
        partial = path.with_suffix(f".{os.getpid()}.part")
        save_file({str(i): f.contiguous().cpu() for i, f in enumerate(features)}, partial)
        os.replace(partial, path)  # atomic: another rank of the node never reads half a file


class FeatureCache:
    """get/put lists of per-image feature tensors ([C,H,W] each) by key."""

    def __init__(self, mode: str, namespace: str, device: torch.device, root: Path | None = None) -> None:
        self.mode = mode
        self.device = device
        self.memory: dict[str, list[torch.Tensor]] = {}
        self.disk: DiskEntries | None = None
        if mode == "disk":
            if root is None:
                raise ValueError("a disk feature cache needs a folder")
            self.disk = DiskEntries(root / "features" / namespace)
            self.disk.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> list[torch.Tensor] | None:
        found = self.memory.get(key) if self.disk is None else self.disk.read(key, str(self.device))
        self.count(found is not None)
        return found

    def holds(self, key: str) -> bool:
        """Whether the memory cache has `key` (the loader may then skip decoding that image)."""
        return key in self.memory

    def count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def put(self, key: str, features: list[torch.Tensor]) -> None:
        if self.disk is None:
            self.memory[key] = [f.detach().clone() for f in features]  # not a view of the batch
        else:
            self.disk.write(key, features)


def cached_features(
    cache: FeatureCache,
    keys: list[str],
    images: torch.Tensor,
    encode,
    loaded: list[list[torch.Tensor] | None] | None = None,
    decoded: list[bool] | None = None,
) -> list[torch.Tensor]:
    """Per-level [B,...] features for a batch: entries the data loader already read (`loaded`,
    None where it had none), cached entries, and the rest encoded now (only those images) and
    stored. `images` holds the rows `decoded` marks (all rows when it is None), in order."""
    loaded = loaded or [None] * len(keys)
    decoded = decoded or [True] * len(keys)
    image_row = {i: n for n, i in enumerate(i for i, d in enumerate(decoded) if d)}
    found: list[list[torch.Tensor] | None] = []
    for key, entry in zip(keys, loaded, strict=True):
        if entry is None:
            entry = cache.get(key)
        else:
            cache.count(hit=True)
        found.append(entry)
    missing = [i for i, f in enumerate(found) if f is None]
    if any(i not in image_row for i in missing):  # the loader skipped decoding on a promise
        raise RuntimeError(f"feature cache entries vanished: {[keys[i] for i in missing if i not in image_row]}")
    if missing:
        computed = encode(images[[image_row[i] for i in missing]])
        for row, i in enumerate(missing):
            found[i] = [level[row] for level in computed]
            cache.put(keys[i], found[i])
    return [torch.stack([f[level] for f in found]) for level in range(len(found[0]))]
