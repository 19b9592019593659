"""Image-encoder features of a frozen encoder, computed once and reused every epoch.

A frozen encoder maps the same input to the same features, so training only needs them once per
(image content, flip). Entries are keyed by the image file's content hash and the flip; the cache
folder (or dict) is named by a fingerprint of everything else that changes the features: the
encoder's weights, the preprocessing (size, resize mode, mean, std) and the dtype they are kept
in. Change any of them and the old entries are simply never looked up again.

`memory` keeps entries on the training device; `disk` writes one safetensors file per entry to
the node-local cache folder, shared by the node's ranks and kept across restarts. Either way the
data loader is told which images are cached and does not decode them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import astuple
from pathlib import Path

import structlog
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kubetune_trainer.errors import KubetuneError
from kubetune_trainer.promptable.data import Preprocess

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
    """The disk cache's files: one safetensors file per key, written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        """A complete entry is there: the file is as long as its header says (a node that lost
        power after the rename can leave an empty or short file). Reads about a kilobyte."""
        try:
            with self._path(key).open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                length = int.from_bytes(fh.read(8), "little")
                if size < 8 or length > size - 8:
                    return False
                header = json.loads(fh.read(length))
        except (OSError, ValueError):
            return False
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return size == 8 + length + end

    def read(self, key: str, device: str = "cpu") -> list[torch.Tensor] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(path, device=device)
        except Exception:  # damaged on disk: drop it, so it is computed again
            log.warning("unreadable feature cache entry; removed", path=str(path))
            path.unlink(missing_ok=True)
            return None
        return [tensors[str(i)] for i in range(len(tensors))]

    def write(self, key: str, features: list[torch.Tensor]) -> None:
        path = self._path(key)
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

    def holds(self, key: str) -> bool:
        """Whether `key` is cached: the data loader then does not decode that image."""
        return key in self.memory if self.disk is None else self.disk.has(key)

    def get(self, key: str) -> list[torch.Tensor] | None:
        found = self.memory.get(key) if self.disk is None else self.disk.read(key, str(self.device))
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: str, features: list[torch.Tensor]) -> None:
        if self.disk is None:
            self.memory[key] = [f.detach().clone() for f in features]  # not a view of the batch
        else:
            self.disk.write(key, features)


def cached_features(
    cache: FeatureCache, keys: list[str], images: torch.Tensor, encode, decoded: list[bool] | None = None
) -> list[torch.Tensor]:
    """Per-level [B,...] features for a batch: cached entries as they are, the rest encoded now
    (only those images) and stored. `images` holds the rows `decoded` marks (all rows when it
    is None), in order: the loader does not decode images the cache held when it drew them."""
    decoded = decoded or [True] * len(keys)
    image_row = {i: n for n, i in enumerate(i for i, d in enumerate(decoded) if d)}
    found = [cache.get(k) for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    lost = [keys[i] for i in missing if i not in image_row]
    if lost:  # a disk entry damaged after the loader checked it (now removed)
        raise KubetuneError(f"feature cache entries became unreadable: {lost}; a restart computes them again")
    if missing:
        computed = encode(images[[image_row[i] for i in missing]])
        for row, i in enumerate(missing):
            found[i] = [level[row] for level in computed]
            cache.put(keys[i], found[i])
    return [torch.stack([f[level] for f in found]) for level in range(len(found[0]))]
