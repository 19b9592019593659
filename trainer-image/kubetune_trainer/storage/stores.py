"""Object storage behind one small interface: S3 (boto3) and local folders (file:// URIs).

Datasets, base weights, checkpoints and reports all move through `ObjectStore`, so the trainer
treats `s3://runs/x/` and `file:///tmp/runs/x/` the same way. boto3 errors become `ConfigError`s
that name the missing bucket, prefix or credential, with the original exception as the cause.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlparse

import boto3
import boto3.exceptions
import botocore.exceptions
import s3transfer.exceptions
import structlog
from boto3.s3.transfer import TransferConfig, TransferManager
from botocore.config import Config
from s3transfer.subscribers import BaseSubscriber

from kubetune_trainer.config import StorageSpec, environment
from kubetune_trainer.errors import ConfigError, KubetuneError, StorageUnavailable

log = structlog.get_logger(__name__)
T = TypeVar("T")
# What an outage, an overloaded endpoint or a dropped connection raises: worth retrying.
TRANSIENT = (
    botocore.exceptions.ConnectionError,  # refused, unreachable, connect timeouts
    botocore.exceptions.HTTPClientError,  # resets, read timeouts, proxy and TLS failures
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    s3transfer.exceptions.RetriesExceededError,
)
TRANSIENT_CODES = {
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException",
    "RequestLimitExceeded", "500", "502", "503", "504",
}  # fmt: skip

MiB = 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    """Key relative to the store's prefix, with '/' separators."""
    size: int
    etag: str | None = None


@dataclass(frozen=True)
class Location:
    scheme: str
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> Location:
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ConfigError(f"{uri!r} names no bucket (expected s3://bucket/prefix/)")
            return cls("s3", parsed.netloc, parsed.path.lstrip("/"))
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise ConfigError(f"{uri!r}: file:// URIs take an absolute path (file:///data/x)")
            return cls("file", "", parsed.path)
        raise ConfigError(f"{uri!r}: only s3:// and file:// URIs are supported")


class ObjectStore(Protocol):
    uri: str

    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def download(self, key: str, dest: Path) -> None: ...
    def download_many(self, objects: list[ObjectInfo], root: Path, workers: int) -> Iterator[ObjectInfo]: ...
    def upload(self, src: Path, key: str) -> None: ...
    def put_bytes(self, data: bytes, key: str) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def delete(self, keys: list[str]) -> None: ...
    def verify(self, obj: ObjectInfo, path: Path) -> bool: ...
    def abort_uploads(self, prefix: str) -> int: ...


class FileStore:
    """A folder on a filesystem, addressed with the same keys as an S3 prefix."""

    def __init__(self, root: Path, uri: str) -> None:
        self.root = root
        self.uri = uri

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / prefix
        if not base.exists():
            return []
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        return [ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size) for p in files]

    def download(self, key: str, dest: Path) -> None:
        src = self.root / key
        if not src.is_file():
            raise ConfigError(f"{self.uri}{key} does not exist")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)

    def download_many(self, objects: list[ObjectInfo], root: Path, workers: int) -> Iterator[ObjectInfo]:
        for obj in objects:
            self.download(obj.key, root / obj.key)
            yield obj

    def upload(self, src: Path, key: str) -> None:
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)  # readers never see a half-written file

    def put_bytes(self, data: bytes, key: str) -> None:
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, dest)

    def get_bytes(self, key: str) -> bytes:
        path = self.root / key
        if not path.is_file():
            raise ConfigError(f"{self.uri}{key} does not exist")
        return path.read_bytes()

    def delete(self, keys: list[str]) -> None:
        """Remove the files, and the folders they leave empty (a pruned checkpoint leaves none)."""
        for key in keys:
            path = self.root / key
            path.unlink(missing_ok=True)
            for folder in path.parents:
                if folder == self.root or not folder.is_relative_to(self.root):
                    break
                try:
                    folder.rmdir()  # only succeeds when empty
                except OSError:
                    break

    def verify(self, obj: ObjectInfo, path: Path) -> bool:
        return path.stat().st_size == obj.size

    def abort_uploads(self, prefix: str) -> int:
        return 0  # a folder has no half-done uploads: files land under a .partial name


class S3Store:
    """A bucket prefix. One boto3 client, shared by download threads (clients are thread-safe)."""

    def __init__(self, location: Location, storage: StorageSpec, uri: str) -> None:
        self.bucket = location.bucket
        self.prefix = location.prefix if not location.prefix or location.prefix.endswith("/") else location.prefix + "/"
        self.uri = uri
        self.endpoint = storage.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # A session of its own: the default session caches credentials across stores.
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=storage.region,
            config=Config(
                retries={"max_attempts": 4, "mode": "standard"},
                # S3's checksum headers: uploads carry one, downloads are checked against the
                # object's full-object checksum where it has one (besides kubetune's ETag check).
                request_checksum_calculation="when_supported",
                response_checksum_validation="when_supported",
                connect_timeout=5,
                read_timeout=60,
                max_pool_connections=32,
            ),
        )

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """boto3's errors as kubetune's: what retrying cannot fix exits 2 naming the bucket, key
        or credential; what an outage causes is `StorageUnavailable` (retried by `_call`)."""
        where = f"s3://{self.bucket}/{what}" + (f" at {self.endpoint}" if self.endpoint else "")
        try:
            yield
        except botocore.exceptions.NoCredentialsError as exc:
            raise ConfigError(
                f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(in a cluster: spec.storage.credentialsSecret)"
            ) from exc
        except (*TRANSIENT, botocore.exceptions.ClientError) as exc:
            raise _translated(exc, where, self.bucket) from exc
        except boto3.exceptions.S3UploadFailedError as exc:  # boto3 wraps the real error of an upload
            raise _translated(exc.__cause__ or exc.__context__ or exc, where, self.bucket) from exc

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """`fn` (one idempotent request), retried with backoff while S3 is unavailable, for up to
        KUBETUNE_STORAGE_RETRY_S; then `StorageUnavailable` (exit 1: the Job retries the pod)."""
        budget = float(os.environ.get(environment.STORAGE_RETRY_S, environment.DEFAULT_STORAGE_RETRY_S))
        deadline, delay = time.monotonic() + budget, 0.5
        while True:
            try:
                with self._errors(what):
                    return fn()
            except StorageUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise StorageUnavailable(f"{exc} (retried for {budget:.0f} s)") from exc
                log.warning("storage unavailable, retrying", key=what, in_s=delay, reason=str(exc))
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        def listing() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if key and not key.endswith("/"):
                        out.append(ObjectInfo(key, obj["Size"], obj["ETag"].strip('"')))
            return out

        return self._call(self.prefix + prefix, listing)

    def download(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        self._call(self.prefix + key, lambda: self.client.download_file(self.bucket, self.prefix + key, str(tmp)))
        os.replace(tmp, dest)

    def download_many(self, objects: list[ObjectInfo], root: Path, workers: int) -> Iterator[ObjectInfo]:
        """Every object to root/key through one shared TransferManager (no HEAD request: the
        listing already gave the sizes), each under a .partial name until it is complete; yields
        each object once its file is in place, while the others still download."""
        with self._errors(self.prefix), TransferManager(self.client, TransferConfig(max_concurrency=workers)) as tm:
            pending = []
            for obj in objects:
                dest = root / obj.key
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(dest.name + ".partial")
                future = tm.download(self.bucket, self.prefix + obj.key, str(tmp), subscribers=[_KnownSize(obj.size)])
                pending.append((obj, future, tmp, dest))
            for obj, future, tmp, dest in pending:
                try:
                    with self._errors(self.prefix + obj.key):
                        future.result()
                except StorageUnavailable:  # this one again alone, with the retry budget
                    self.download(obj.key, dest)
                    yield obj
                    continue
                os.replace(tmp, dest)
                yield obj

    def upload(self, src: Path, key: str) -> None:
        self._call(self.prefix + key, lambda: self.client.upload_file(str(src), self.bucket, self.prefix + key))

    def put_bytes(self, data: bytes, key: str) -> None:
        self._call(
            self.prefix + key, lambda: self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        )

    def get_bytes(self, key: str) -> bytes:
        return self._call(
            self.prefix + key, lambda: self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        )

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # the API's batch limit
            batch = [{"Key": self.prefix + k} for k in keys[start : start + 1000]]
            self._call(
                self.prefix,
                lambda batch=batch: self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )

    def verify(self, obj: ObjectInfo, path: Path) -> bool:
        return _s3_verify(self, obj, path)

    def abort_uploads(self, prefix: str) -> int:
        """Abort multipart uploads a killed writer left under `prefix` (S3 keeps, and bills,
        their parts forever); returns how many."""
        key = self.prefix + prefix
        listing = self._call(key, lambda: self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key))
        uploads = listing.get("Uploads", [])
        for up in uploads:
            self._call(
                up["Key"],
                lambda up=up: self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
                ),
            )
        return len(uploads)


def _translated(exc: BaseException, where: str, bucket: str) -> KubetuneError:
    """A boto3 error as kubetune's: what retrying cannot fix (exit 2, naming the bucket, key or
    credential) or what an outage causes (`StorageUnavailable`, retried by `S3Store._call`)."""
    if isinstance(exc, TRANSIENT):
        return StorageUnavailable(f"S3 unavailable for {where}: {type(exc).__name__}: {exc}")
    if not isinstance(exc, botocore.exceptions.ClientError):
        return KubetuneError(f"S3 error on {where}: {exc}")
    code = exc.response.get("Error", {}).get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    if code in ("NoSuchBucket",):
        return ConfigError(f"bucket {bucket!r} does not exist ({where})")
    if code in ("NoSuchKey", "404", "NotFound"):
        return ConfigError(f"{where} does not exist")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return ConfigError(f"S3 refused access to {where} ({code}): check the credentials")
    if code in TRANSIENT_CODES or status >= 500:
        return StorageUnavailable(f"S3 unavailable for {where}: {code or status}")
    return KubetuneError(f"S3 error on {where}: {exc}")


def _s3_verify(store: S3Store, obj: ObjectInfo, path: Path) -> bool:
    """Whether the downloaded `path` is `obj`: its size, and its ETag computed from the bytes,
    with the part size S3 reports for a multipart object (not guessed). An object encrypted
    with SSE-KMS or SSE-C has an ETag that is no MD5: its size is all S3 offers to check."""
    if path.stat().st_size != obj.size:
        return False
    if not obj.etag or etag_matches(path, obj.etag):  # the usual part sizes first: no request
        return True
    key = store.prefix + obj.key
    multipart = "-" in obj.etag
    extra = {"PartNumber": 1} if multipart else {}
    head = store._call(key, lambda: store.client.head_object(Bucket=store.bucket, Key=key, **extra))
    if head.get("ServerSideEncryption") == "aws:kms" or head.get("SSECustomerAlgorithm"):
        return True
    return multipart and _md5(path, int(head["ContentLength"])) == obj.etag


class _KnownSize(BaseSubscriber):
    """Tells s3transfer the object's size, which saves a HEAD request per object."""

    def __init__(self, size: int) -> None:
        self.size = size

    def on_queued(self, future, **kwargs) -> None:
        future.meta.provide_transfer_size(self.size)


def open_store(uri: str, storage: StorageSpec) -> ObjectStore:
    """The store for a `s3://bucket/prefix/` or `file:///path/` URI."""
    location = Location.parse(uri)
    if location.scheme == "file":
        return FileStore(Path(location.prefix), uri if uri.endswith("/") else uri + "/")
    return S3Store(location, storage, uri if uri.endswith("/") else uri + "/")


def split_object_uri(uri: str) -> tuple[str, str]:
    """`s3://b/models/x.pt` -> (`s3://b/models/`, `x.pt`): a single object as a store and a key."""
    head, _, name = uri.rstrip("/").rpartition("/")
    if not name or head.endswith(":/"):
        raise ConfigError(f"{uri!r} does not name an object")
    return head + "/", name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def etag_matches(path: Path, etag: str | None) -> bool:
    """True when the local file has the S3 ETag (plain MD5, or multipart MD5-of-MD5s)."""
    if not etag:
        return True
    if "-" not in etag:
        return _md5(path, None) == etag
    parts = int(etag.rsplit("-", 1)[1])
    size = path.stat().st_size
    # The part size is not recorded; try boto3's default and the usual MiB-rounded sizes.
    candidates = {8 * MiB, 16 * MiB, 5 * MiB, -(-size // parts // MiB) * MiB}
    return any(_md5(path, c) == etag for c in sorted(candidates) if c and -(-size // c) == parts)


def _md5(path: Path, part_size: int | None) -> str:
    if part_size is None:
        digest = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(MiB), b""):
                digest.update(chunk)
        return digest.hexdigest()
    digests = []
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(part_size), b""):
            digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    combined = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{combined}-{len(digests)}"
