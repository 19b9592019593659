"""Weights over plain HTTP(S): Meta's SAM2.1 checkpoints, Detectron2's model zoo, an internal
mirror. A download goes to `<dest>.part` and resumes from where it stopped (HTTP Range), is
checked for its size, its SHA-256 when one is given and a header that parses, and only then
takes its name, so a file under its final name is always whole."""

from __future__ import annotations

import http.client
import json
import os
import struct
import time
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


def looks_whole(path: Path, suffix: str | None = None) -> bool:
    """Whether the file parses as its kind (by `suffix`, else its own): a safetensors file whose
    header's tensors end where the file does, a torch zip (or legacy pickle), a pickle that ends
    with its STOP opcode. A file cut short, or an HTML error page under a .pt name, does not."""
    suffix = (suffix or path.suffix).lower()
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if suffix == ".safetensors":
                (length,) = struct.unpack("<Q", head)
                if length > size - 8:
                    return False
                header = json.loads(fh.read(length))
                ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
                return max(ends, default=0) == size - 8 - length
            if suffix == ".pkl":
                fh.seek(-1, os.SEEK_END)
                return head[:1] == b"\x80" and fh.read(1) == b"."
        if suffix in (".pt", ".pth", ".ckpt"):
            return (head[:4] == b"PK\x03\x04" and zipfile.is_zipfile(path)) or head[
                :1
            ] == b"\x80"  # torch's zip starts at 0
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False
    return size > 0


def download(url: str, dest: Path, sha256: str | None = None) -> tuple[Path, int]:
    """(`url` as the whole, checked file `dest`, bytes downloaded); a file already whole is kept.
    A resumed download that fails its checks (the file changed under it) is fetched once anew."""
    if dest.is_file() and looks_whole(dest) and (sha256 is None or sha256_of(dest) == sha256):
        return dest, 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = part.exists() and part.stat().st_size > 0
    got = _fetch_all(url, part)
    problem = _problem(part, dest.suffix, sha256)
    if problem and resumed:
        log.warning("a resumed download does not check out; fetching it anew", url=url, reason=problem)
        part.unlink()
        got = _fetch_all(url, part)
        problem = _problem(part, dest.suffix, sha256)
    if problem:
        part.unlink()
        raise ConfigError(f"model.checkpoint {url}: {problem}")
    os.replace(part, dest)
    return dest, got


def _problem(part: Path, suffix: str, sha256: str | None) -> str | None:
    if sha256 is not None and (actual := sha256_of(part)) != sha256:
        return f"SHA-256 is {actual}, model.checkpointSha256 says {sha256}"
    if not looks_whole(part, suffix):
        return f"the file downloaded is not a whole {suffix} checkpoint"
    return None


def _fetch_all(url: str, part: Path) -> int:
    """Fetch into `part`, resuming after a dropped connection; returns the bytes received."""
    start = part.stat().st_size if part.exists() else 0
    for attempt in range(ATTEMPTS):
        try:
            _fetch(url, part)
            return part.stat().st_size - start
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                raise
            have = part.stat().st_size if part.exists() else 0
            if attempt == 0 and have == 0 and _unreachable(exc):
                raise ConfigError(
                    f"model.checkpoint {url}: cannot download ({exc}); without network access, "
                    "set storage.mirror (see `kubetune weights mirror`)"
                ) from exc
            if attempt == ATTEMPTS - 1:  # the bytes so far stay: the Job's retry resumes from them
                raise KubetuneError(f"model.checkpoint {url}: the download keeps breaking off ({exc})") from exc
            log.warning("download interrupted, resuming", url=url, have_bytes=have, reason=str(exc))
            time.sleep(attempt + 1)
    raise AssertionError("unreachable")


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
