"""Checkpoints in object storage, written so that a reader never sees half of one.

Layout under output.uri:
  checkpoints/step-00000500/state.pt       model, optimizer, scaler, scheduler, position, RNG
  checkpoints/step-00000500/manifest.json  written last; a checkpoint without it does not exist
A crash mid-upload leaves a folder without a manifest, which resume ignores and pruning removes.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from kubetune_trainer.errors import KubetuneError, StorageUnavailable
from kubetune_trainer.storage.staging import fetch_object
from kubetune_trainer.storage.stores import ObjectStore

log = structlog.get_logger(__name__)
# What a damaged, refused or foreign checkpoint raises (torch's reader on a broken zip: RuntimeError;
# weights_only's refusal: UnpicklingError).
UNLOADABLE = (KubetuneError, OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError)
UNLOADABLE += (pickle.UnpicklingError, zipfile.BadZipFile)
PREFIX = "checkpoints/"
STATE = "state.pt"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^checkpoints/step-(\d{8})/(.+)$")


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    uri: str
    bytes: int
    seconds: float


def _folder(step: int) -> str:
    return f"{PREFIX}step-{step:08d}/"


class Checkpointer:
    def __init__(self, store: ObjectStore, cache_root: Path, keep_last: int) -> None:
        self.store = store
        self.cache_root = cache_root
        self.keep_last = keep_last

    def uri(self, step: int) -> str:
        """Where checkpoint `step` lives, for logs and status."""
        return f"{self.store.uri}{_folder(step)}"

    def _folders(self) -> dict[int, set[str]]:
        found: dict[int, set[str]] = {}
        for obj in self.store.list(PREFIX):
            match = _STEP_DIR.match(obj.key)
            if match:
                found.setdefault(int(match.group(1)), set()).add(match.group(2))
        return found

    def complete_steps(self) -> list[int]:
        return sorted(step for step, names in self._folders().items() if MANIFEST in names)

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Any], extras: dict[str, Path] | None = None) -> SavedCheckpoint:
        """Upload state.pt and `extras` (files that must match this state, e.g. the metric log so
        far), then the manifest (sizes and sha256), then prune."""
        start = time.perf_counter()
        folder = _folder(step)
        files = {}
        with tempfile.TemporaryDirectory(prefix="kubetune-ckpt-") as tmp:
            path = Path(tmp) / STATE
            torch.save(state, path)
            for name, source in {STATE: path, **(extras or {})}.items():
                if source.exists():
                    files[name] = {"bytes": source.stat().st_size, "sha256": _sha256(source)}
                    self.store.upload(source, folder + name)
        size = sum(f["bytes"] for f in files.values())
        manifest = {"step": step, "created": time.time(), "files": files}
        self.store.put_bytes(json.dumps(manifest, indent=1).encode(), folder + MANIFEST)
        self.prune()
        saved = SavedCheckpoint(step, self.store.uri + folder, size, time.perf_counter() - start)
        log.info("checkpoint saved", step=step, uri=saved.uri, bytes=size, seconds=round(saved.seconds, 2))
        return saved

    def load(self, step: int) -> dict[str, Any]:
        folder = _folder(step)
        manifest = self._manifest(step)
        local = fetch_object(self.store, folder + STATE, self.cache_root / "checkpoints")
        expected = manifest["files"][STATE]
        if local.stat().st_size != expected["bytes"] or _sha256(local) != expected["sha256"]:
            raise KubetuneError(f"checkpoint {self.store.uri}{folder} does not match its manifest")
        return torch.load(local, map_location="cpu", weights_only=True)

    def _manifest(self, step: int) -> dict[str, Any]:
        manifest = json.loads(self.store.get_bytes(_folder(step) + MANIFEST))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("its manifest lists no files")
        return manifest

    def fetch_extra(self, step: int, name: str, dest: Path) -> bool:
        """Copy a file saved with checkpoint `step` to `dest`, checked against the manifest;
        False if that checkpoint has none."""
        manifest = self._manifest(step)
        if name not in manifest["files"]:
            return False
        data = self.store.get_bytes(_folder(step) + name)
        expected = manifest["files"][name]
        if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise KubetuneError(f"{self.uri(step)}{name} does not match its manifest")
        dest.write_bytes(data)
        return True

    def newest_usable(self) -> int | None:
        """The newest complete checkpoint whose files all match the manifest and whose state
        loads; older ones are tried in turn, and each one passed over is logged with why. An
        outage is not a reason to pass one over: it is raised. Uploads a killed writer left
        unfinished are aborted first."""
        self.store.abort_uploads(PREFIX)
        for step in reversed(self.complete_steps()):
            try:
                self.load(step)
                with tempfile.TemporaryDirectory(prefix="kubetune-ckpt-") as tmp:
                    for name in set(self._manifest(step)["files"]) - {STATE}:
                        self.fetch_extra(step, name, Path(tmp) / name)
                return step
            except StorageUnavailable:
                raise
            except (
                KubetuneError,
                OSError,
                ValueError,
                KeyError,
                TypeError,
                RuntimeError,
                EOFError,
                *UNLOADABLE,
            ) as exc:
                # RuntimeError: torch's reader on a damaged zip; UnpicklingError: weights_only's refusal
                log.warning("checkpoint unusable, trying an older one", step=step, uri=self.uri(step), reason=str(exc))
        return None

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and stale partials.

        The manifest goes first, so a checkpoint being deleted is never mistaken for a complete one.
        """
        folders = self._folders()
        complete = sorted(s for s, names in folders.items() if MANIFEST in names)
        if aborted := self.store.abort_uploads(PREFIX):  # parts of uploads a killed writer began
            log.info("aborted unfinished checkpoint uploads", count=aborted)
        keep = set(complete[-self.keep_last :])
        newest = complete[-1] if complete else -1
        for step, names in sorted(folders.items()):
            if step in keep or step > newest:  # a newer partial may be another writer's upload
                continue
            if MANIFEST in names:
                self.store.delete([_folder(step) + MANIFEST])
            self.store.delete([_folder(step) + n for n in sorted(names - {MANIFEST})])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
