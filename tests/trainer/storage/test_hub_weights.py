"""hf:// base weights through the real huggingface_hub client, against a Hub-compatible endpoint on
loopback (HF_ENDPOINT): only the family's files are fetched, a restart or a second job on the node
downloads nothing it already has, LFS files are shared by SHA-256 (and checked), and every way the
Hub says no is one line that names the URI and what to do, without the token."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from huggingface_hub import constants as hf_constants
from kubetune_trainer.config import StorageSpec
from kubetune_trainer.errors import ConfigError, KubetuneError
from kubetune_trainer.storage.hub import HubRef
from kubetune_trainer.storage.shared import SharedFiles
from kubetune_trainer.storage.weights import Weights, fetch_weights
from safetensors.torch import load_file, save_file

TOKEN = "hf_secret"
SAM = "facebook/sam-vit-base"
SAM2 = "facebook/sam2.1-hiera-tiny"
PRIVATE = "acme/private-sam"
GATED = "meta/gated-sam2"
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def commit_of(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


def git_blob_sha(data: bytes) -> str:
    """The ETag the Hub gives a file kept in git (not LFS): its git blob SHA-1."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # commit -> path -> content
    refs: dict[str, str]  # branch or tag -> commit
    lfs: set[str]  # paths kept in LFS (served from the "CDN", ETag = SHA-256)
    token: str | None = None  # private: this bearer token only
    gated: bool = False  # gated: 403 GatedRepo whatever the token


@dataclass(frozen=True)
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    authorization: str | None
    range: str | None


@dataclass
class FakeHub:
    """The /resolve endpoint of the Hub (HEAD and GET) and its LFS CDN, as huggingface_hub reads them."""

    url: str = ""
    cdn_url: str = ""
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    fail_with: int | None = None  # /resolve requests answer this status...
    fail_from: int = 0  # ... from the n-th /resolve request on (counting from 0)
    hook: Callable[[Request], None] | None = None  # called on each request, before it is answered
    lock: threading.Lock = field(default_factory=threading.Lock)

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for files in repo.commits.values():
                for path, data in files.items():
                    if path in repo.lfs and hashlib.sha256(data).hexdigest() == sha256:
                        return data
        return None

    def record(self, request: Request) -> None:
        with self.lock:
            self.requests.append(request)

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()

    def gets(self) -> list[Request]:
        return [r for r in self.requests if r.method == "GET"]

    def files_asked(self) -> set[str]:
        return {m["file"] for r in self.requests if (m := RESOLVE.match(r.path))}


class Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format, *args) -> None:  # quiet
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        role = self.server.role  # type: ignore[attr-defined]
        path = urlsplit(self.path).path
        request = Request(role, self.command, path, self.headers.get("Authorization"), self.headers.get("Range"))
        self.hub.record(request)
        if self.hub.hook is not None:
            self.hub.hook(request)
        if role == "cdn":
            self._cdn(path, body)
        else:
            self._resolve(path, body)

    def _send(self, status: int, headers: dict[str, str], data: bytes = b"", body: bool = True) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, headers, b'{"error": "%s"}' % message.encode(), self.command == "GET")

    def _resolve(self, path: str, body: bool) -> None:
        hub = self.hub
        served = sum(1 for r in hub.requests if r.server == "hub") - 1
        if hub.fail_with is not None and served >= hub.fail_from:  # Retry-After: huggingface_hub waits 1 s, not 1-8 s
            return self._error(
                hub.fail_with, None, "Internal Error - We're working hard to fix this", {"Retry-After": "0"}
            )
        match = RESOLVE.match(path)
        if match is None:
            return self._error(404, None, "Not Found")
        repo_id, rev, name = match["repo"], unquote(match["rev"]), unquote(match["file"])
        repo = hub.repos.get(repo_id)
        auth = self.headers.get("Authorization")
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        if repo.token is not None and auth != f"Bearer {repo.token}":
            return self._error(401, "RepoNotFound", "Invalid username or password.")
        if repo.gated:
            return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted.")
        commit = repo.refs.get(rev, rev if rev in repo.commits else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = repo.commits[commit]
        if name not in files:
            return self._error(404, "EntryNotFound", f"{name} does not exist on {rev!r}", {"X-Repo-Commit": commit})
        data = files[name]
        if name in repo.lfs:  # as the Hub: a redirect to a signed CDN URL, the LFS SHA-256 and size
            sha = hashlib.sha256(data).hexdigest()
            headers = {
                "X-Repo-Commit": commit,
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{sha}"',
                "Location": f"{hub.cdn_url}/cdn/{sha}?Expires=9999999999&Signature=abc",
            }
            return self._send(302, headers, b"", body)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha(data)}"', "Accept-Ranges": "bytes"}
        self._send_content(data, headers, body)

    def _cdn(self, path: str, body: bool) -> None:
        data = self.hub.blob(path.removeprefix("/cdn/"))
        if data is None:
            return self._send(404, {}, b"NoSuchKey", body)
        self._send_content(data, {"ETag": f'"{hashlib.md5(data).hexdigest()}"', "Accept-Ranges": "bytes"}, body)

    def _send_content(self, data: bytes, headers: dict[str, str], body: bool) -> None:
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if wanted is None:
            return self._send(200, headers, data, body)
        start = int(wanted[1])
        end = int(wanted[2]) if wanted[2] else len(data) - 1
        if start >= len(data):
            return self._send(416, {"Content-Range": f"bytes */{len(data)}"}, b"", body)
        headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
        self._send(206, headers, data[start : end + 1], body)


def serve(hub: FakeHub, role: str) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hub = hub  # type: ignore[attr-defined]
    server.role = role  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    return server


@dataclass(frozen=True)
class Contents:
    config: bytes
    safetensors: bytes
    pt: bytes
    pt_v1: bytes
    big: bytes


@pytest.fixture(scope="module")
def contents(tmp_path_factory) -> Contents:
    folder = tmp_path_factory.mktemp("hub-contents")
    save_file({"vision_encoder.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, folder / "m.safetensors")

    def pt(value: float) -> bytes:
        buffer = io.BytesIO()
        torch.save({"model": {"image_encoder.weight": torch.full((2, 3), value)}}, buffer)
        return buffer.getvalue()

    return Contents(
        config=b'{"model_type": "sam", "vision_config": {"hidden_size": 768}}\n',
        safetensors=(folder / "m.safetensors").read_bytes(),
        pt=pt(2.0),
        pt_v1=pt(1.0),
        big=bytes(range(256)) * 8192,  # 2 MiB: a file of the repo the job does not need
    )


@pytest.fixture
def hub(contents: Contents, monkeypatch, tmp_path: Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    main, v1 = commit_of("main"), commit_of("v1.0")
    fake.repos = {
        SAM: Repo(
            {
                main: {
                    "config.json": contents.config,
                    "model.safetensors": contents.safetensors,
                    "tf_model.h5": contents.big,
                }
            },
            {"main": main},
            {"model.safetensors", "tf_model.h5"},
        ),
        SAM2: Repo(
            {
                main: {
                    "sam2.1_hiera_tiny.pt": contents.pt,
                    "checkpoints/sam2.1_hiera_tiny.pt": contents.pt,
                    "sam2.1_hiera_t.yaml": b"model: {}\n",
                    "big.bin": contents.big,
                },
                v1: {"sam2.1_hiera_tiny.pt": contents.pt_v1},
            },
            {"main": main, "v1.0": v1},
            {"sam2.1_hiera_tiny.pt", "checkpoints/sam2.1_hiera_tiny.pt", "big.bin"},
        ),
        PRIVATE: Repo({main: {"model.pt": contents.pt}}, {"main": main}, {"model.pt"}, token=TOKEN),
        GATED: Repo({main: {"model.pt": contents.pt}}, {"main": main}, {"model.pt"}, gated=True),
    }
    servers = [serve(fake, "hub"), serve(fake, "cdn")]
    fake.url, fake.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    # Neither the developer's Hub cache nor their stored token may take part.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    yield fake
    for server in servers:
        server.shutdown()
        server.server_close()


def fetch(uri: str, family: str, variant: str, cache: Path, shared: Path, folder: bool = False, **storage) -> Path:
    path, _ = fetch_weights(
        Weights(uri, family, variant, folder=folder), StorageSpec(**storage), cache, SharedFiles(shared)
    )
    return path


def sam(cache: Path, shared: Path) -> Path:
    return fetch(f"hf://{SAM}", "sam", "vit-base", cache, shared, folder=True)


def sam2(uri: str, cache: Path, shared: Path, variant: str = "sam2.1_hiera_tiny") -> Path:
    return fetch(uri, "sam2", variant, cache, shared)


def test_sam_folder_holds_exactly_its_two_files(hub: FakeHub, contents: Contents, tmp_path: Path) -> None:
    folder = sam(tmp_path / "cache", tmp_path / "shared")
    assert folder == tmp_path / "cache" / "hf" / SAM / commit_of("main")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (folder / "config.json").read_bytes() == contents.config
    assert (folder / "model.safetensors").read_bytes() == contents.safetensors
    assert load_file(folder / "model.safetensors")["vision_encoder.weight"].shape == (3, 4)
    # Only the family's files were asked for; the repo's other (big) file never was.
    assert hub.files_asked() == {"config.json", "model.safetensors"}
    assert [r.path for r in hub.gets() if r.server == "hub"] == [f"/{SAM}/resolve/{commit_of('main')}/config.json"]
    sha = hashlib.sha256(contents.safetensors).hexdigest()
    assert [r.path for r in hub.gets() if r.server == "cdn"] == [f"/cdn/{sha}"]
    # The LFS file is offered to the node's other jobs under its SHA-256; the git-stored one is not.
    assert [p.name for p in (tmp_path / "shared").iterdir()] == [f"sha256-{sha}"]


def test_sam2_file_revision_and_explicit_path(hub: FakeHub, contents: Contents, tmp_path: Path) -> None:
    cache, shared = tmp_path / "cache", tmp_path / "shared"
    path = sam2(f"hf://{SAM2}", cache, shared)
    assert path == cache / "hf" / SAM2 / commit_of("main") / "sam2.1_hiera_tiny.pt"
    assert path.read_bytes() == contents.pt
    assert torch.load(path, weights_only=True)["model"]["image_encoder.weight"][0, 0] == 2.0
    assert hub.files_asked() == {"sam2.1_hiera_tiny.pt"}

    hub.clear()  # @revision goes to the resolve URL; what it names is what lands
    old = sam2(f"hf://{SAM2}@v1.0", cache, shared)
    assert hub.requests[0].path == f"/{SAM2}/resolve/v1.0/sam2.1_hiera_tiny.pt"
    assert old == cache / "hf" / SAM2 / commit_of("v1.0") / "sam2.1_hiera_tiny.pt"
    assert old.read_bytes() == contents.pt_v1

    hub.clear()  # a file named in the URI, in a folder of the repo
    named = sam2(f"hf://{SAM2}/checkpoints/sam2.1_hiera_tiny.pt", cache, shared)
    assert named == cache / "hf" / SAM2 / commit_of("main") / "checkpoints" / "sam2.1_hiera_tiny.pt"
    assert named.read_bytes() == contents.pt
    assert hub.files_asked() == {"checkpoints/sam2.1_hiera_tiny.pt"}
    assert not any(r.method == "GET" for r in hub.requests)  # same content as main's .pt: the shared copy
    # A commit SHA works as a revision too.
    assert sam2(f"hf://{SAM2}@{commit_of('v1.0')}", cache, shared).read_bytes() == contents.pt_v1


def test_second_call_downloads_nothing(hub: FakeHub, contents: Contents, tmp_path: Path) -> None:
    cache, shared = tmp_path / "cache", tmp_path / "shared"
    first_sam, first_pt = sam(cache, shared), sam2(f"hf://{SAM2}", cache, shared)
    hub.clear()
    assert sam(cache, shared) == first_sam and sam2(f"hf://{SAM2}", cache, shared) == first_pt
    assert hub.requests and all(r.method == "HEAD" and r.server == "hub" for r in hub.requests)
    assert (first_sam / "model.safetensors").read_bytes() == contents.safetensors


def test_second_job_takes_lfs_files_from_the_shared_folder(hub: FakeHub, contents: Contents, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    sam(tmp_path / "job-a", shared)
    sam2(f"hf://{SAM2}", tmp_path / "job-a", shared)
    hub.clear()
    folder = sam(tmp_path / "job-b", shared)
    pt = sam2(f"hf://{SAM2}", tmp_path / "job-b", shared)
    assert (folder / "model.safetensors").read_bytes() == contents.safetensors
    assert (folder / "config.json").read_bytes() == contents.config
    assert pt.read_bytes() == contents.pt and pt.is_relative_to(tmp_path / "job-b")
    # No LFS body was downloaded again; config.json is kept in git (no SHA-256) and is fetched anew.
    assert not [r for r in hub.requests if r.server == "cdn"]
    assert [r.path for r in hub.gets()] == [f"/{SAM}/resolve/{commit_of('main')}/config.json"]


def test_corrupted_shared_copy_is_downloaded_again(hub: FakeHub, contents: Contents, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    first = sam2(f"hf://{SAM2}", tmp_path / "job-a", shared)
    copy = shared / f"sha256-{hashlib.sha256(contents.pt).hexdigest()}"
    assert copy.read_bytes() == contents.pt
    copy.write_bytes(b"\x80" + bytes(len(contents.pt) - 1))  # same size, another content
    hub.clear()
    again = sam2(f"hf://{SAM2}", tmp_path / "job-b", shared)
    assert again.read_bytes() == contents.pt and first.read_bytes() == contents.pt
    assert [r.server for r in hub.gets()] == ["cdn"]
    assert copy.read_bytes() == contents.pt  # shared anew, checked


def assert_no_token(exc: BaseException) -> None:
    chain: BaseException | None = exc
    while chain is not None:  # not in the message, nor in anything chained to it
        assert TOKEN not in str(chain) and "hf_wrong" not in str(chain), chain
        chain = chain.__cause__ or chain.__context__


def assert_one_line(exc: KubetuneError, *parts: str) -> str:
    message = str(exc)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    assert_no_token(exc)
    return message


@pytest.mark.parametrize("with_token", [False, True], ids=["no-token", "token"])
@pytest.mark.parametrize(
    ("uri", "family", "variant", "hints"),
    [
        ("hf://facebook/no-such-repo", "sam", "vit-base", ["hf://facebook/no-such-repo", "no such repo"]),
        (f"hf://{SAM2}@v9", "sam2", "sam2.1_hiera_tiny", [f"hf://{SAM2}@v9", "revision 'v9' does not exist"]),
        (f"hf://{SAM2}", "sam2", "sam2.1_hiera_large", [f"hf://{SAM2}", "'sam2.1_hiera_large.pt'", "name the file"]),
        (f"hf://{SAM}/nested/missing.pt", "sam2", "x", [f"hf://{SAM}", "'nested/missing.pt'"]),
        (f"hf://{GATED}", "sam2", "model", [f"hf://{GATED}", "gated", "accept its terms", "model.hfTokenSecret"]),
    ],
    ids=["unknown-repo", "unknown-revision", "missing-variant", "missing-file", "gated"],
)
def test_hub_refusals_are_one_line_config_errors(
    hub: FakeHub, tmp_path: Path, monkeypatch, uri: str, family: str, variant: str, hints: list[str], with_token: bool
) -> None:
    if with_token:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ConfigError) as info:
        fetch(uri, family, variant, tmp_path / "cache", tmp_path / "shared")
    assert info.value.exit_code == 2
    assert_one_line(info.value, *hints)
    assert not hub.gets()


def test_private_repo_needs_the_token(hub: FakeHub, contents: Contents, tmp_path: Path, monkeypatch) -> None:
    uri = f"hf://{PRIVATE}/model.pt"
    with pytest.raises(ConfigError) as info:
        fetch(uri, "sam2", "x", tmp_path / "cache", tmp_path / "shared")
    assert info.value.exit_code == 2
    assert_one_line(info.value, f"hf://{PRIVATE}", "model.hfTokenSecret")

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(ConfigError) as info:
        fetch(uri, "sam2", "x", tmp_path / "cache", tmp_path / "shared")
    assert_one_line(info.value, f"hf://{PRIVATE}", "the token has no access")

    hub.clear()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = fetch(uri, "sam2", "x", tmp_path / "cache", tmp_path / "shared")
    assert path.read_bytes() == contents.pt
    # The token goes to the Hub, never to the CDN the Hub redirects the LFS download to.
    assert {r.authorization for r in hub.requests if r.server == "hub"} == {f"Bearer {TOKEN}"}
    assert [r.authorization for r in hub.requests if r.server == "cdn"] == [None]


def test_unreachable_endpoint_says_to_set_a_mirror(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ConfigError) as info:
        sam(tmp_path / "cache", tmp_path / "shared")
    assert info.value.exit_code == 2
    assert_one_line(info.value, f"hf://{SAM}", closed, "storage.mirror")


def test_hub_server_error_is_retryable(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail_with = 500
    with pytest.raises(KubetuneError) as info:
        sam2(f"hf://{SAM2}", tmp_path / "cache", tmp_path / "shared")
    assert not isinstance(info.value, ConfigError) and info.value.exit_code == 1
    assert f"hf://{SAM2}" in str(info.value) and "another try" in str(info.value)
    assert_no_token(info.value)
    hub.fail_with = None  # and the retry succeeds
    assert sam2(f"hf://{SAM2}", tmp_path / "cache", tmp_path / "shared").is_file()


@pytest.mark.parametrize(
    "uri", ["hf://onlyorg", "hf://org/repo/../x", "hf://org/re po", "hf://org/repo@", "hf://org/repo//x.pt"]
)
def test_parse_refuses_malformed_uris(uri: str) -> None:
    with pytest.raises(ConfigError) as info:
        HubRef.parse(uri)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_parse_and_files() -> None:
    ref = HubRef.parse("hf://facebook/sam2.1-hiera-tiny@v1.0/checkpoints/a.pt")
    assert ref == HubRef("facebook/sam2.1-hiera-tiny", "v1.0", "checkpoints/a.pt")
    assert ref.files("sam", "vit-base") == ["checkpoints/a.pt"]
    # A revision with "/" is written escaped (a pull request's ref, a feature branch).
    assert HubRef.parse("hf://facebook/sam2.1-hiera-tiny@refs%2Fpr%2F1").revision == "refs/pr/1"
    assert HubRef.parse(f"hf://{SAM}").files("sam", "vit-base") == ["config.json", "model.safetensors"]
    assert HubRef.parse(f"hf://{SAM2}").files("sam2", "sam2.1_hiera_tiny") == ["sam2.1_hiera_tiny.pt"]
    with pytest.raises(ConfigError, match=r"hf://org/d2/model_final\.pth"):  # no default file for detectron2
        HubRef.parse("hf://org/d2").files("detectron2", "COCO-Detection/x.yaml")


def test_mirror_stands_in_for_the_hub(hub: FakeHub, contents: Contents, tmp_path: Path) -> None:
    mirror = tmp_path / "m"
    (mirror / "hf" / SAM / "main").mkdir(parents=True)
    (mirror / "hf" / SAM / "main" / "config.json").write_bytes(contents.config)
    (mirror / "hf" / SAM / "main" / "model.safetensors").write_bytes(contents.safetensors)
    folder = fetch(
        f"hf://{SAM}", "sam", "vit-base", tmp_path / "cache", tmp_path / "shared", True, mirror=f"file://{mirror}/"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (folder / "config.json").read_bytes() == contents.config
    assert (folder / "model.safetensors").read_bytes() == contents.safetensors
    assert hub.requests == []


def test_hub_server_error_is_one_line(hub: FakeHub, tmp_path: Path) -> None:
    hub.fail_with = 500
    with pytest.raises(KubetuneError) as info:
        sam2(f"hf://{SAM2}", tmp_path / "cache", tmp_path / "shared")
    assert "\n" not in str(info.value)


def test_a_push_between_two_files_keeps_the_folder_whole(hub: FakeHub, contents: Contents, tmp_path: Path) -> None:
    repo, pushed = hub.repos[SAM], commit_of("pushed")
    repo.commits[pushed] = dict(repo.commits[commit_of("main")])

    def push_after_config(request: Request) -> None:
        if request.method == "GET" and request.path.endswith("/config.json"):
            repo.refs["main"] = pushed

    hub.hook = push_after_config
    folder = sam(tmp_path / "cache", tmp_path / "shared")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_hub_outage_during_the_download_is_retryable(hub: FakeHub, tmp_path: Path) -> None:
    hub.fail_with, hub.fail_from = 503, 1  # hf_hub_download's own HEAD, after fetch's: ~5 s of its retries
    with pytest.raises(KubetuneError) as info:
        sam2(f"hf://{SAM2}", tmp_path / "cache", tmp_path / "shared")
    assert info.value.exit_code == 1, str(info.value)


def test_a_named_ckpt_file_is_returned_as_the_file(hub: FakeHub, contents: Contents, tmp_path: Path) -> None:
    repo = hub.repos[SAM2]
    repo.commits[commit_of("main")]["model.ckpt"] = contents.pt
    repo.lfs.add("model.ckpt")
    path = sam2(f"hf://{SAM2}/model.ckpt", tmp_path / "cache", tmp_path / "shared")
    assert path.is_file() and path.read_bytes() == contents.pt
