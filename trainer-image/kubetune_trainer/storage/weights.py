"""Base weights from where they are published, on local disk: s3:// and file:// (as datasets),
hf:// (the Hub), https:// and http://, detectron2:// (Detectron2's model zoo), or the
storage.mirror prefix that stands in for the last three on a cluster without internet access.
What lands in the job's cache stays there, so a restart downloads nothing it already has."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from kubetune_trainer.config import StorageSpec, environment
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.paths import OutsideRoot, checked_key
from kubetune_trainer.storage import hub, web
from kubetune_trainer.storage.shared import SharedFiles
from kubetune_trainer.storage.staging import StageReport, fetch_object, stage
from kubetune_trainer.storage.stores import open_store, sha256_of, split_object_uri

PUBLISHED = ("hf://", "https://", "http://", "detectron2://")


@dataclass(frozen=True)
class Weights:
    """What a job asks for: `uri` as written in model.checkpoint, and how it loads."""

    uri: str
    family: str
    variant: str
    sha256: str | None = None

    folder: bool = False  # a transformers SAM model folder (config.json + model.safetensors)


def zoo_url(uri: str) -> str:
    """detectron2://<path> as Detectron2 resolves it (its model-zoo prefix, or a mirror's)."""
    base = os.environ.get(environment.DETECTRON2_ZOO_URL) or environment.DEFAULT_DETECTRON2_ZOO_URL
    return base.rstrip("/") + "/" + uri.removeprefix("detectron2://")


def mirrored(uri: str, weights: Weights, mirror: str) -> list[str]:
    """The mirror's URIs for a published `uri`: one per file (hf:// folders have several)."""
    base = mirror if mirror.endswith("/") else mirror + "/"
    if uri.startswith("hf://"):
        ref = hub.HubRef.parse(uri)
        rev = ref.revision or "main"
        return [f"{base}hf/{ref.repo}/{rev}/{name}" for name in ref.files(weights.family, weights.variant)]
    if uri.startswith("detectron2://"):
        return [f"{base}detectron2/{uri.removeprefix('detectron2://')}"]
    parsed = urlparse(uri)
    return [f"{base}{parsed.scheme}/{parsed.netloc}{parsed.path}"]


def fetch_weights(weights: Weights, storage: StorageSpec, cache: Path, shared: SharedFiles | None) -> tuple[Path, int]:
    """(the weights on local disk, bytes downloaded). Errors name the URI and what to do."""
    uri = weights.uri
    if storage.mirror and uri.startswith(PUBLISHED):
        return _from_store_files(mirrored(uri, weights, storage.mirror), weights, storage, cache, shared)
    if uri.startswith(("s3://", "file://")):
        return _from_store(uri, weights, storage, cache, shared)
    if uri.startswith("hf://"):
        ref = hub.HubRef.parse(uri)
        return hub.fetch(ref, ref.files(weights.family, weights.variant), cache / "hf", shared, weights.folder)
    url = zoo_url(uri) if uri.startswith("detectron2://") else uri
    name = Path(urlparse(url).path).name
    try:
        checked_key(name)
    except OutsideRoot as exc:
        raise ConfigError(f"model.checkpoint {uri!r} does not name a file: {exc}") from exc
    dest = cache / "web" / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    key = f"sha256:{weights.sha256}" if weights.sha256 else None
    if key and shared is not None and not dest.is_file() and shared.take(key, None, dest):
        return dest, 0
    path, got = web.download(url, dest, weights.sha256)
    if key and shared is not None:
        shared.offer(path, key, path.stat().st_size)
    return path, got


def _from_store(uri: str, weights: Weights, storage: StorageSpec, cache: Path, shared) -> tuple[Path, int]:
    if weights.folder:  # a transformers model folder, "/" or not
        report: StageReport = stage(open_store(uri, storage), cache, shared)
        return report.root, report.bytes_downloaded
    folder, key = split_object_uri(uri)
    path = fetch_object(open_store(folder, storage), key, cache / "weights", shared)
    _check(path, uri, weights.sha256)
    return path, 0


def _from_store_files(uris: list[str], weights: Weights, storage: StorageSpec, cache: Path, shared):
    paths = []
    for uri in uris:
        folder, key = split_object_uri(uri)
        paths.append(fetch_object(open_store(folder, storage), key, cache / "mirror", shared))
        _check(paths[-1], uri, weights.sha256 if len(uris) == 1 else None)
    return (paths[0].parent if weights.folder else paths[0]), 0


def _check(path: Path, uri: str, sha256: str | None) -> None:
    if sha256 is not None and (actual := sha256_of(path)) != sha256:
        raise ConfigError(f"model.checkpoint {uri}: SHA-256 is {actual}, model.checkpointSha256 says {sha256}")
