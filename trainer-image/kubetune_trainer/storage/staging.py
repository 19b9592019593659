"""Copy a dataset or weights from object storage into the job's node-local cache, once per node.

Local rank 0 of each node calls `stage`; the other ranks wait at a barrier (see `distributed`).
Files already in the job's cache with the same size and ETag are kept, so a restarted pod starts
training within seconds instead of downloading the dataset again; files another job on the node
already downloaded are taken from the shared cache after their content is checked
(`storage.shared`). Object keys are names from a bucket, so a key that is not a plain relative
path is refused before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog

from kubetune_trainer.errors import ConfigError, DataError, KubetuneError
from kubetune_trainer.paths import OutsideRoot, checked_key, inside
from kubetune_trainer.storage.shared import SharedFiles
from kubetune_trainer.storage.stores import FileStore, ObjectInfo, ObjectStore, etag_matches

log = structlog.get_logger(__name__)
INDEX_NAME = ".kubetune-staged.json"


@dataclass(frozen=True)
class StageReport:
    root: Path
    downloaded: int
    skipped: int
    bytes_downloaded: int
    shared: int = 0  # taken from the node's shared cache instead of downloaded


def cache_dir_for(cache: Path, store: ObjectStore) -> Path:
    """A stable folder per source (URI and endpoint), so two sources never share files."""
    source = f"{store.uri} {getattr(store, 'endpoint', '') or ''}"
    return cache / "stage" / hashlib.sha256(source.encode()).hexdigest()[:16]


def destinations(root: Path, objects: list[ObjectInfo], uri: str) -> dict[str, Path]:
    """Where each object lands. Refused, naming the keys, when a key is not a plain relative
    path or would land outside `root` through a symlink (checked before `root` exists, too)."""
    out, refused = {}, []
    for obj in objects:
        try:
            out[obj.key] = inside(root, checked_key(obj.key)) if root.exists() else root / checked_key(obj.key)
        except OutsideRoot as exc:
            refused.append(str(exc))
    if refused:
        shown = "; ".join(refused[:3]) + (f" (and {len(refused) - 3} more)" if len(refused) > 3 else "")
        raise DataError(f"{uri}: {len(refused)} object key(s) would be written outside the cache: {shown}")
    return out


def _read_index(path: Path) -> dict:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or damaged by a lost node: every file is checked again
        return {}
    return index if isinstance(index, dict) else {}


def stage(store: ObjectStore, cache: Path, shared: SharedFiles | None = None, workers: int = 16) -> StageReport:
    """Make the whole prefix of `store` available under the job's `cache` and return where it is.

    file:// stores are already on a filesystem and are used in place.
    """
    if isinstance(store, FileStore):
        if not store.root.is_dir():
            raise ConfigError(f"{store.uri} does not exist or is not a folder")
        return StageReport(store.root, 0, 0, 0)
    objects = store.list()
    if not objects:
        raise ConfigError(f"{store.uri} holds no objects (wrong bucket or prefix?)")
    root = cache_dir_for(cache, store)
    destinations(root, objects, store.uri)  # every key is checked before the first byte is written
    root.mkdir(parents=True, exist_ok=True)
    dest = destinations(root, objects, store.uri)  # and again against symlinks in the cache
    index_path = root / INDEX_NAME
    index = _read_index(index_path)
    todo = [o for o in objects if not _is_current(dest[o.key], o, index)]
    taken = [o for o in todo if shared is not None and shared.take(o.etag, o.size, dest[o.key])]
    fetch = [o for o in todo if o not in taken]
    log.info(
        "staging", source=store.uri, cache=str(root), objects=len(objects), shared=len(taken), to_download=len(fetch)
    )
    for obj in taken:
        index[obj.key] = {"size": obj.size, "etag": obj.etag}
    for obj in store.download_many(fetch, root, workers):  # verified while the rest download
        path = dest[obj.key]
        _verified(store, obj, path)
        index[obj.key] = {"size": obj.size, "etag": obj.etag}
        if shared is not None:
            shared.offer(path, obj.etag, obj.size)
    _write_index(index_path, index)
    return StageReport(root, len(fetch), len(objects) - len(todo), sum(o.size for o in fetch), len(taken))


def _write_index(path: Path, index: dict) -> None:
    """Atomically: a unique temporary name (pods of several nodes may share a cache folder),
    flushed to disk, then renamed over the old one; readers see the old index or the new."""
    tmp = path.with_name(f"{INDEX_NAME}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w") as fh:
        json.dump(index, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _is_current(path: Path, obj: ObjectInfo, index: dict) -> bool:
    """Indexed with this size and ETag, or (a staging killed before it wrote the index) a
    complete file whose content has the ETag: downloads land under a .partial name first."""
    if not path.is_file() or path.stat().st_size != obj.size:
        return False
    if index.get(obj.key) == {"size": obj.size, "etag": obj.etag}:
        return True
    if obj.etag and etag_matches(path, obj.etag):
        index[obj.key] = {"size": obj.size, "etag": obj.etag}
        return True
    return False


def fetch_object(store: ObjectStore, key: str, cache: Path, shared: SharedFiles | None = None) -> Path:
    """One object (base weights, a checkpoint file) on local disk; file:// objects in place."""
    if isinstance(store, FileStore):
        path = store.root / key
        if not path.is_file():
            raise ConfigError(f"{store.uri}{key} does not exist")
        return path
    matches = [o for o in store.list(key) if o.key == key]
    if not matches:
        raise ConfigError(f"{store.uri}{key} does not exist")
    obj = matches[0]
    root = cache_dir_for(cache, store)
    dest = destinations(root, [obj], store.uri)[key]
    if dest.is_file() and dest.stat().st_size == obj.size and etag_matches(dest, obj.etag):
        return dest
    if shared is None or not shared.take(obj.etag, obj.size, dest):
        store.download(key, dest)
        _verified(store, obj, dest)  # base weights too: a flipped byte must not train silently
        if shared is not None and etag_matches(dest, obj.etag):
            shared.offer(dest, obj.etag, obj.size)
    return dest


def _verified(store: ObjectStore, obj: ObjectInfo, path: Path) -> None:
    """A download that does not match its object is fetched once more; twice wrong is an error
    worth a pod retry (a transfer that corrupts, an object changing under us)."""
    if store.verify(obj, path):
        return
    log.warning("a download does not match its size/ETag; fetching it again", key=obj.key)
    store.download(obj.key, path)
    if not store.verify(obj, path):
        path.unlink(missing_ok=True)
        raise KubetuneError(f"{store.uri}{obj.key}: downloaded twice, and twice it does not match its size/ETag")
