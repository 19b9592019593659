"""Copy a dataset or weights from object storage into a node-local cache, once per node.

Local rank 0 of each node calls `stage`; the other ranks wait at a barrier (see `distributed`).
Files already in the cache with the same size and ETag are kept, so a restarted pod starts
training within seconds instead of downloading the dataset again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.storage.stores import FileStore, ObjectInfo, ObjectStore, etag_matches

log = structlog.get_logger(__name__)
INDEX_NAME = ".kubetune-staged.json"


@dataclass(frozen=True)
class StageReport:
    root: Path
    downloaded: int
    skipped: int
    bytes_downloaded: int


def cache_dir_for(cache_root: Path, uri: str) -> Path:
    """A stable folder per source URI, so two jobs with different data never share files."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache_root / "stage" / digest


def stage(store: ObjectStore, cache_root: Path, workers: int = 16) -> StageReport:
    """Make the whole prefix of `store` available on local disk and return where it is.

    file:// stores are already on a filesystem and are used in place.
    """
    if isinstance(store, FileStore):
        if not store.root.is_dir():
            raise ConfigError(f"{store.uri} does not exist or is not a folder")
        return StageReport(store.root, 0, 0, 0)
    objects = store.list()
    if not objects:
        raise ConfigError(f"{store.uri} holds no objects (wrong bucket or prefix?)")
    root = cache_dir_for(cache_root, store.uri)
    root.mkdir(parents=True, exist_ok=True)
    index_path = root / INDEX_NAME
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    todo = [o for o in objects if not _is_current(root, o, index)]
    log.info("staging", source=store.uri, cache=str(root), objects=len(objects), to_download=len(todo))

    for obj in store.download_many(todo, root, workers):  # verified while the rest download
        dest = root / obj.key
        if dest.stat().st_size != obj.size or not etag_matches(dest, obj.etag):
            dest.unlink(missing_ok=True)
            raise DataError(f"{store.uri}{obj.key}: downloaded file does not match its size/ETag")
        index[obj.key] = {"size": obj.size, "etag": obj.etag}
    tmp = index_path.with_name(f"{INDEX_NAME}.{os.getpid()}")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, index_path)  # the node's other ranks may be reading it
    return StageReport(root, len(todo), len(objects) - len(todo), sum(o.size for o in todo))


def _is_current(root: Path, obj: ObjectInfo, index: dict) -> bool:
    """Indexed with this size and ETag, or (a staging killed before it wrote the index) a
    complete file whose content has the ETag: downloads land under a .partial name first."""
    path = root / obj.key
    if not path.is_file() or path.stat().st_size != obj.size:
        return False
    if index.get(obj.key) == {"size": obj.size, "etag": obj.etag}:
        return True
    if obj.etag and etag_matches(path, obj.etag):
        index[obj.key] = {"size": obj.size, "etag": obj.etag}
        return True
    return False


def fetch_object(store: ObjectStore, key: str, cache_root: Path) -> Path:
    """One object (base weights, a checkpoint file) on local disk; file:// objects in place."""
    if isinstance(store, FileStore):
        path = store.root / key
        if not path.is_file():
            raise ConfigError(f"{store.uri}{key} does not exist")
        return path
    matches = [o for o in store.list(key) if o.key == key]
    if not matches:
        raise ConfigError(f"{store.uri}{key} does not exist")
    dest = cache_dir_for(cache_root, store.uri) / key
    if not (dest.is_file() and dest.stat().st_size == matches[0].size and etag_matches(dest, matches[0].etag)):
        store.download(key, dest)
    return dest
