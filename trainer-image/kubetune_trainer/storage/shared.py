"""Files the jobs of one node share: a dataset several jobs stage, the same base weights.

A shared file is kept under the ETag and size its bucket reports, and it is trusted only after
its content is checked against that ETag again, each time a job reuses it. So a file that another
job (or anything else with access to the node's cache) changed is detected, dropped and
downloaded anew. Jobs take a copy into their own cache, so a change to a shared file after it was
checked never reaches a job's inputs.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import structlog

from kubetune_trainer.storage.stores import etag_matches, sha256_of

log = structlog.get_logger(__name__)
ETAG = re.compile(r"^[0-9a-f]{32}(-[0-9]+)?$")  # an MD5, or a multipart MD5-of-MD5s with its part count
SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


class SharedFiles:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, etag: str | None, size: int | None) -> Path | None:
        """Where the file with this content lives; None when the ETag cannot name content.
        `sha256:<hex>` names content too (weights whose SHA-256 the spec or the Hub gives)."""
        if etag and SHA256.match(etag):
            return self.folder / etag.replace(":", "-")
        return self.folder / f"{etag}-{size}" if etag and ETAG.match(etag) else None

    def take(self, etag: str | None, size: int | None, dest: Path) -> bool:
        """Copy the shared file with this ETag and size to `dest` when there is one whose content
        still has that ETag. The copy is what is checked, so the shared file cannot change between
        the check and the use; a shared file that fails the check is removed."""
        path = self._path(etag, size)
        if path is None or not path.is_file():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        try:
            shutil.copyfile(path, partial)
        except OSError:
            return False
        if (size is not None and partial.stat().st_size != size) or not content_matches(partial, etag):
            log.warning("a shared cache file no longer matches its ETag; removed, downloading anew", path=str(path))
            partial.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
            return False
        os.replace(partial, dest)
        return True

    def offer(self, src: Path, etag: str | None, size: int | None) -> None:
        """Share a file this job downloaded and checked; readers never see a partial copy."""
        path = self._path(etag, size)
        if path is None or path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.part")  # several nodes' ranks may offer at once
        shutil.copyfile(src, partial)
        os.replace(partial, path)


def content_matches(path: Path, key: str | None) -> bool:
    """The file has this S3 ETag, or this `sha256:<hex>`."""
    if key and SHA256.match(key):
        return sha256_of(path) == key.removeprefix("sha256:")
    return etag_matches(path, key)
