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


class FeatureCache:
    """get/put lists of per-image feature tensors ([C,H,W] each) by key."""

    def __init__(self, mode: str, namespace: str, device: torch.device, root: Path | None = None) -> None:
        self.mode = mode
        self.device = device
        self.memory: dict[str, list[torch.Tensor]] = {}
        self.folder = (root / "features" / namespace) if root is not None else None
        if mode == "disk":
            if self.folder is None:
                raise ValueError("a disk feature cache needs a folder")
            self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> list[torch.Tensor] | None:
        if self.mode == "memory":
            found = self.memory.get(key)
        else:
            path = self.folder / f"{key}.safetensors"
            found = None
            if path.is_file():
                try:
                    tensors = load_file(path, device=str(self.device))
                    found = [tensors[str(i)] for i in range(len(tensors))]
                except Exception:  # a torn file from a killed writer: recompute it
                    log.warning("unreadable feature cache entry; recomputing", path=str(path))
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: str, features: list[torch.Tensor]) -> None:
        if self.mode == "memory":
            self.memory[key] = [f.detach().clone() for f in features]  # not a view of the batch
            return
        path = self.folder / f"{key}.safetensors"
        partial = path.with_suffix(f".{os.getpid()}.part")
        save_file({str(i): f.contiguous().cpu() for i, f in enumerate(features)}, partial)
        os.replace(partial, path)  # atomic: another rank of the node never reads half a file


def cached_features(cache: FeatureCache, keys: list[str], images: torch.Tensor, encode) -> list[torch.Tensor]:
    """Per-level [B,...] features for a batch: cached entries as they are, the rest encoded now
    (only those images) and stored."""
    found = [cache.get(k) for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        computed = encode(images[missing])
        for row, i in enumerate(missing):
            found[i] = [level[row] for level in computed]
            cache.put(keys[i], found[i])
    return [torch.stack([f[level] for f in found]) for level in range(len(found[0]))]
