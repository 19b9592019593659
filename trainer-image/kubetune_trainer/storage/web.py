"""Weights over plain HTTP(S): Meta's SAM2.1 checkpoints, Detectron2's model zoo, an internal
mirror. A download goes to `<dest>.part` and resumes from where it stopped (HTTP Range), is
checked for its size, its SHA-256 when one is given and a header that parses, and only then
takes its name, so a file under its final name is always whole."""

from __future__ import annotations

import http.client
import json
import os
import struct
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import structlog

from kubetune_trainer.errors import ConfigError, KubetuneError
from kubetune_trainer.storage.stores import sha256_of

log = structlog.get_logger(__name__)
CHUNK = 1 << 20
ATTEMPTS = 4  # a connection that drops mid-file resumes this many times
HINTS = {
    401: "the server wants credentials: use an s3:// copy or storage.mirror",
    403: "access is refused: check the URL, or use an s3:// copy or storage.mirror",
    404: "nothing is published there: check the URL",
}


def looks_whole(path: Path) -> bool:
    """Whether the file's header parses as its kind's (safetensors, a torch zip or pickle, a
    pickle): a file cut short, or an HTML error page saved under a .pt name, does not."""
    suffix = path.suffix.lower()
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if suffix == ".safetensors":
                if len(head) < 8:
                    return False
                (length,) = struct.unpack("<Q", head)
                if length > path.stat().st_size - 8:
                    return False
                json.loads(fh.read(length))
                return True
        if suffix in (".pt", ".pth", ".ckpt"):
            return zipfile.is_zipfile(path) or head[:1] == b"\x80"
        if suffix == ".pkl":
            return head[:1] == b"\x80"
    except (OSError, ValueError, struct.error):
        return False
    return path.stat().st_size > 0


def download(url: str, dest: Path, sha256: str | None = None) -> Path:
    """`url` as the whole, checked file `dest` (kept as it is when it already is)."""
    if dest.is_file() and looks_whole(dest) and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(ATTEMPTS):
        try:
            _fetch(url, part)
            break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                raise
            got = part.stat().st_size if part.exists() else 0
            if attempt == ATTEMPTS - 1 or (attempt == 0 and got == 0 and _unreachable(exc)):
                raise ConfigError(
                    f"model.checkpoint {url}: cannot download ({exc}); without network access, "
                    "set storage.mirror (see `kubetune weights mirror`)"
                ) from exc
            log.warning("download interrupted, resuming", url=url, have_bytes=got, reason=str(exc))
    if sha256 is not None and (actual := sha256_of(part)) != sha256:
        part.unlink()
        raise ConfigError(f"model.checkpoint {url}: SHA-256 is {actual}, model.checkpointSha256 says {sha256}")
    if not looks_whole(part):
        part.unlink()
        raise ConfigError(f"model.checkpoint {url}: the file downloaded is not a {dest.suffix} checkpoint")
    os.replace(part, dest)
    return dest


def _unreachable(exc: BaseException) -> bool:
    reason = getattr(exc, "reason", exc)
    return isinstance(reason, OSError) and not isinstance(reason, TimeoutError | ConnectionResetError)


def _fetch(url: str, part: Path) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "kubetune", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # asked past the end: what we have is all there is
            return
        hint = HINTS.get(exc.code, "the server failed: try again later" if exc.code >= 500 else "check the URL")
        error = KubetuneError if exc.code >= 500 else ConfigError  # a server's bad day is worth a retry
        raise error(f"model.checkpoint {url}: HTTP {exc.code} {exc.reason}; {hint}") from exc
    with response:
        resumed = response.status == 206
        total = response.headers.get("Content-Length")
        expected = (int(total) + (have if resumed else 0)) if total is not None else None
        with part.open("ab" if resumed else "wb") as out:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)
    got = part.stat().st_size
    if expected is not None and got != expected:
        raise ConnectionError(f"the connection closed at {got} of {expected} bytes")
