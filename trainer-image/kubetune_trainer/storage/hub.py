"""Weights on the Hugging Face Hub, `hf://<org>/<repo>[@<revision>][/<file>]`, fetched with
huggingface_hub itself: HF_ENDPOINT (a mirror) and HF_TOKEN (from model.hfTokenSecret) are read
as its users set them, and only the files the family needs are downloaded. Files the Hub stores
in LFS carry their SHA-256, so they are checked and shared between the node's jobs by content."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from kubetune_trainer.config import environment
from kubetune_trainer.errors import ConfigError, KubetuneError
from kubetune_trainer.paths import OutsideRoot, checked_key
from kubetune_trainer.storage.shared import SharedFiles
from kubetune_trainer.storage.stores import sha256_of
from kubetune_trainer.storage.web import looks_whole

log = structlog.get_logger(__name__)
SHA256 = re.compile(r"^[0-9a-f]{64}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str | None = None
    path: str | None = None  # one file of the repo; None: the family's files

    @classmethod
    def parse(cls, uri: str) -> HubRef:
        parts = uri.removeprefix("hf://").split("/")
        if len(parts) < 2:
            raise ConfigError(f"model.checkpoint {uri!r}: write hf://<org>/<repo>[@<revision>][/<file>]")
        org, name = parts[0], parts[1]
        name, _, revision = name.partition("@")
        if not NAME.match(org) or not NAME.match(name) or (revision == "" and "@" in parts[1]):
            raise ConfigError(f"model.checkpoint {uri!r}: write hf://<org>/<repo>[@<revision>][/<file>]")
        path = "/".join(parts[2:]) or None
        if path is not None:
            try:
                checked_key(path)
            except OutsideRoot as exc:
                raise ConfigError(f"model.checkpoint {uri!r}: {exc}") from exc
        return cls(f"{org}/{name}", revision or None, path)

    def files(self, family: str, variant: str) -> list[str]:
        """What the family loads: a transformers SAM folder, Meta's SAM2 .pt, or the named file."""
        if self.path is not None:
            return [self.path]
        if family == "sam":
            return ["config.json", "model.safetensors"]
        if family == "sam2":
            return [f"{variant}.pt"]
        raise ConfigError(
            f"model.checkpoint hf://{self.repo}: name the weights file in the repo for a {family} job, "
            f"e.g. hf://{self.repo}/model_final.pth"
        )


def fetch(ref: HubRef, files: list[str], cache: Path, shared: SharedFiles | None) -> Path:
    """The files on local disk, under cache/<org>/<repo>/<commit>/; returns that folder, or the
    file when there is one file and the job loads a file."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    endpoint = os.environ.get(environment.HF_ENDPOINT) or None
    token = os.environ.get(environment.HF_TOKEN) or None
    folder = None
    for name in files:
        uri = f"hf://{ref.repo}{'@' + ref.revision if ref.revision else ''}/{name}"
        try:
            meta = get_hf_file_metadata(hf_hub_url(ref.repo, name, revision=ref.revision, endpoint=endpoint), token)
        except Exception as exc:  # huggingface_hub's errors and httpx's, told apart by `_explain`
            raise _explain(exc, ref, name, token is not None) from exc
        folder = cache / ref.repo / (meta.commit_hash or ref.revision or "main")
        dest = folder / name
        key = f"sha256:{meta.etag}" if meta.etag and SHA256.match(meta.etag) else None
        if dest.is_file() and dest.stat().st_size == meta.size and looks_whole(dest):
            continue
        if key and shared is not None and shared.take(key, meta.size, dest):
            log.info("weights from the node's shared cache", uri=uri)
            continue
        _download(ref, name, meta.commit_hash or ref.revision, dest, token, endpoint, uri)
        if dest.stat().st_size != meta.size or (key and sha256_of(dest) != meta.etag) or not looks_whole(dest):
            dest.unlink()
            raise KubetuneError(f"model.checkpoint {uri}: the file downloaded does not match the Hub's size/SHA-256")
        if key and shared is not None:
            shared.offer(dest, key, meta.size)
    assert folder is not None
    return folder / files[0] if len(files) == 1 and files[0].endswith((".pt", ".pth", ".pkl")) else folder


def _download(ref: HubRef, name: str, revision: str | None, dest: Path, token, endpoint, uri: str) -> None:
    from huggingface_hub import hf_hub_download

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".hub-") as tmp:
        try:
            got = hf_hub_download(ref.repo, name, revision=revision, local_dir=tmp, token=token, endpoint=endpoint)
        except Exception as exc:
            raise _explain(exc, ref, name, token is not None) from exc
        log.info("downloaded weights", uri=uri, bytes=Path(got).stat().st_size)
        shutil.move(got, dest)


def _explain(exc: Exception, ref: HubRef, name: str, has_token: bool) -> KubetuneError:
    """One line naming the URI and what to do, for each way the Hub says no."""
    from huggingface_hub import errors

    where = f"model.checkpoint hf://{ref.repo}{'@' + ref.revision if ref.revision else ''}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.GatedRepoError):
        return ConfigError(f"{where}: the repo is gated: accept its terms on the Hub, then set model.hfTokenSecret")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ConfigError(f"{where}: revision {ref.revision!r} does not exist in {ref.repo}")
    if isinstance(exc, errors.RepositoryNotFoundError) or status in (401, 403):
        access = "the token has no access to it" if has_token else "private repos need model.hfTokenSecret"
        return ConfigError(f"{where}: no such repo, or {access}")
    if isinstance(exc, errors.EntryNotFoundError | getattr(errors, "RemoteEntryNotFoundError", ())) or status == 404:
        return ConfigError(f"{where}: the repo has no file {name!r} (name the file: hf://{ref.repo}/<file>)")
    if status is not None and status < 500:
        return ConfigError(f"{where}: the Hub answered HTTP {status}: {exc}")
    if status is None and not isinstance(exc, errors.HfHubHTTPError):
        endpoint = os.environ.get(environment.HF_ENDPOINT) or "https://huggingface.co"
        return ConfigError(
            f"{where}: cannot reach the Hub at {endpoint} ({type(exc).__name__}); without network access, "
            "set storage.mirror (see `kubetune weights mirror`) or HF_ENDPOINT"
        )
    return KubetuneError(f"{where}: the Hub failed ({exc}); worth another try")
