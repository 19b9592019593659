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
from urllib.parse import unquote

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
        # A revision with "/" (refs/pr/1, feature/x) is written escaped: @refs%2Fpr%2F1.
        return cls(f"{org}/{name}", unquote(revision) or None, path)

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


def fetch(ref: HubRef, files: list[str], cache: Path, shared: SharedFiles | None, folder: bool) -> tuple[Path, int]:
    """(the files on local disk under cache/<org>/<repo>/<commit>/: that folder when the job
    loads a folder, else the file; bytes downloaded). Every file comes from one commit: the
    revision's when the first file is asked for, so a push in between cannot split a folder."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    endpoint = (os.environ.get(environment.HF_ENDPOINT) or "").rstrip("/") or None
    token = os.environ.get(environment.HF_TOKEN) or None
    revision, commit, got = ref.revision, None, 0
    for name in files:
        uri = f"hf://{ref.repo}{'@' + ref.revision if ref.revision else ''}/{name}"
        try:
            meta = get_hf_file_metadata(hf_hub_url(ref.repo, name, revision=revision, endpoint=endpoint), token)
        except Exception as exc:  # huggingface_hub's errors and httpx's, told apart by `_explain`
            raise _explain(exc, ref, name, token is not None) from exc
        commit = commit or meta.commit_hash or revision or "main"
        revision = commit if meta.commit_hash else revision
        dest = cache / ref.repo / commit / name
        key = f"sha256:{meta.etag}" if meta.etag and SHA256.match(meta.etag) else None
        if _whole(dest, meta.size, meta.etag if key else None):
            continue
        if key and shared is not None and shared.take(key, meta.size, dest):
            log.info("weights from the node's shared cache", uri=uri)
            continue
        _download(ref, name, revision, dest, token, endpoint, uri)
        if not _whole(dest, meta.size, meta.etag if key else None):
            dest.unlink()
            raise KubetuneError(f"model.checkpoint {uri}: the file downloaded does not match the Hub's size/SHA-256")
        got += meta.size or 0
        if key and shared is not None:
            shared.offer(dest, key, meta.size)
    root = cache / ref.repo / str(commit)
    return (root if folder else root / files[0]), got


def _whole(path: Path, size: int | None, sha256: str | None) -> bool:
    """The file is there, of the Hub's size and SHA-256 (LFS files), and parses as its kind."""
    if not path.is_file() or (size is not None and path.stat().st_size != size) or not looks_whole(path):
        return False
    return sha256 is None or sha256_of(path) == sha256


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
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    said = (getattr(response, "headers", None) or {}).get("X-Error-Message", "") if response is not None else ""
    if isinstance(exc, errors.LocalEntryNotFoundError):  # hf_hub_download's own HEAD failed: an outage
        return KubetuneError(f"{where}: the Hub stopped answering while {name!r} was fetched; worth another try")
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
        return ConfigError(f"{where}: the Hub answered HTTP {status} {said}".rstrip())
    if status is None and not isinstance(exc, errors.HfHubHTTPError):
        endpoint = os.environ.get(environment.HF_ENDPOINT) or "https://huggingface.co"
        return ConfigError(
            f"{where}: cannot reach the Hub at {endpoint} ({type(exc).__name__}); without network access, "
            "set storage.mirror (see `kubetune weights mirror`) or HF_ENDPOINT"
        )
    failed = f"HTTP {status}" if status is not None else type(exc).__name__
    return KubetuneError(f"{where}: the Hub failed ({failed}); worth another try")
