"""Weights over HTTP from a real loopback server: whole downloads of each checkpoint kind, resume
with Range after a dropped connection, SHA-256 and header checks, HTTP errors and an unreachable
host, the node-shared cache keyed by SHA-256, detectron2:// through the zoo URL, storage.mirror."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from kubetune_trainer.config import StorageSpec
from kubetune_trainer.errors import EXIT_BAD_INPUT, EXIT_RETRYABLE, ConfigError, KubetuneError
from kubetune_trainer.storage import web
from kubetune_trainer.storage.shared import SharedFiles
from kubetune_trainer.storage.weights import Weights, fetch_weights, mirrored
from safetensors.torch import save_file

HTML = b"<!DOCTYPE html><html><body><h1>Sign in to continue</h1></body></html>\n"


@dataclass
class Server:
    """What the loopback server serves, and what it was asked for."""

    base: str
    files: dict[str, bytes] = field(default_factory=dict)  # path -> body
    status: dict[str, int] = field(default_factory=dict)  # path -> an error status to answer with
    drops: dict[str, list[int]] = field(default_factory=dict)  # path -> bytes sent before closing, per request
    ignore_range: bool = False  # answer 200 with the whole body to a Range request
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)

    def serve(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.base + path

    def drop(self, path: str, *after: int) -> None:
        """The next requests for `path` send the whole Content-Length, then only `after[i]` bytes."""
        self.drops[path] = list(after)


@pytest.fixture
def server(monkeypatch) -> Iterator[Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    state: Server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            rng = self.headers.get("Range")
            state.requests.append((self.command, self.path, rng))
            if code := state.status.get(self.path):
                self.send_error(code)
                return
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if rng and not state.ignore_range:
                match = re.fullmatch(r"bytes=(\d+)-", rng)
                assert match, rng
                start = int(match[1])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            drops = state.drops.get(self.path)
            if drops:
                self.wfile.write(payload[: drops.pop(0)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early
                return
            self.wfile.write(payload)

        def log_message(self, *args) -> None:  # quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state = Server(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def pt_bytes(tmp_path: Path, size: int = 3) -> bytes:
    """A real torch checkpoint (a zip)."""
    path = tmp_path / "src.pt"
    torch.save({"w": torch.arange(size, dtype=torch.float32)}, path)
    return path.read_bytes()


def safetensors_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "src.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(path))
    return path.read_bytes()


def pkl_bytes() -> bytes:
    """A Detectron2-style model-zoo pickle (protocol 2+)."""
    return pickle.dumps({"model": {"w": list(range(1000))}, "__author__": "test"}, protocol=2)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights(uri: str, sha256: str | None = None) -> Weights:
    return Weights(uri, "sam2", "sam2.1_hiera_tiny", sha256)


# web.py checks the header of `<dest>.part`, whose suffix (.part) is no checkpoint kind's, so a
# download's header check passes whatever arrived (looks_whole falls back to "not empty").


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


# Whole downloads, and a file that is kept.


@pytest.mark.parametrize("kind", ["pt", "pkl", "safetensors"])
def test_each_checkpoint_kind_downloads_whole_and_is_kept(server: Server, tmp_path: Path, kind: str) -> None:
    body = {"pt": pt_bytes, "safetensors": safetensors_bytes}.get(kind, lambda _: pkl_bytes())(tmp_path)
    url = server.serve(f"/models/model_final.{kind}", body)
    cache = tmp_path / "cache"
    path, _ = fetch_weights(weights(url), StorageSpec(), cache, None)
    assert path.name == f"model_final.{kind}" and path.is_relative_to(cache / "web")
    assert path.read_bytes() == body
    assert leftovers(cache) == [path.name]  # no .part left behind
    assert server.requests == [("GET", f"/models/model_final.{kind}", None)]

    again, _ = fetch_weights(weights(url), StorageSpec(), cache, None)
    assert again == path and again.read_bytes() == body
    assert len(server.requests) == 1  # the whole file in the cache is kept: no request


def test_a_real_torch_checkpoint_loads_after_download(server: Server, tmp_path: Path) -> None:
    url = server.serve("/sam2.1_hiera_tiny.pt", pt_bytes(tmp_path, size=5))
    path = web.download(url, tmp_path / "dl" / "sam2.1_hiera_tiny.pt")[0]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5, dtype=torch.float32))


# Resume.


def test_an_interrupted_transfer_resumes_where_it_stopped(server: Server, tmp_path: Path) -> None:
    body = safetensors_bytes(tmp_path)
    url = server.serve("/big.safetensors", body)
    server.drop("/big.safetensors", 5000)
    path = web.download(url, tmp_path / "dl" / "big.safetensors")[0]
    assert path.read_bytes() == body
    assert server.requests == [("GET", "/big.safetensors", None), ("GET", "/big.safetensors", "bytes=5000-")]
    assert leftovers(tmp_path / "dl") == ["big.safetensors"]


def test_several_interruptions_each_resume_from_what_arrived(server: Server, tmp_path: Path) -> None:
    body = pt_bytes(tmp_path, size=4000)
    url = server.serve("/w.pt", body)
    server.drop("/w.pt", 1000, 2500)
    path = web.download(url, tmp_path / "dl" / "w.pt")[0]
    assert path.read_bytes() == body
    assert [r[2] for r in server.requests] == [None, "bytes=1000-", "bytes=3500-"]


def test_a_part_left_by_a_killed_job_resumes(server: Server, tmp_path: Path) -> None:
    body = pt_bytes(tmp_path, size=2000)
    url = server.serve("/w.pt", body)
    dest = tmp_path / "dl" / "w.pt"
    dest.parent.mkdir()
    dest.with_name("w.pt.part").write_bytes(body[:3000])
    assert web.download(url, dest)[0].read_bytes() == body
    assert server.requests == [("GET", "/w.pt", "bytes=3000-")]

    # Killed after the last byte but before the rename: the server has nothing more (416).
    dest.unlink()
    dest.with_name("w.pt.part").write_bytes(body)
    assert web.download(url, dest)[0].read_bytes() == body
    assert server.requests[-1] == ("GET", "/w.pt", f"bytes={len(body)}-")
    assert leftovers(dest.parent) == ["w.pt"]


def test_a_server_that_ignores_range_sends_it_whole_again(server: Server, tmp_path: Path) -> None:
    body = pt_bytes(tmp_path, size=2000)
    url = server.serve("/w.pt", body)
    server.ignore_range = True
    server.drop("/w.pt", 3000)
    path = web.download(url, tmp_path / "dl" / "w.pt")[0]
    assert path.read_bytes() == body  # the 200 replaced the partial file instead of being appended
    assert [r[2] for r in server.requests] == [None, "bytes=3000-"]


def test_a_connection_that_keeps_dropping_gives_up_naming_the_url(server: Server, tmp_path: Path) -> None:
    body = pt_bytes(tmp_path, size=2000)
    url = server.serve("/w.pt", body)
    server.drop("/w.pt", *[100] * web.ATTEMPTS)
    with pytest.raises(KubetuneError, match=re.escape(url)):
        web.download(url, tmp_path / "dl" / "w.pt")[0]
    assert len(server.requests) == web.ATTEMPTS
    assert not (tmp_path / "dl" / "w.pt").exists()
    # What arrived is kept: the next try (a restarted pod) goes on from there.
    assert (tmp_path / "dl" / "w.pt.part").stat().st_size == 100 * web.ATTEMPTS
    assert web.download(url, tmp_path / "dl" / "w.pt")[0].read_bytes() == body
    assert server.requests[-1][2] == f"bytes={100 * web.ATTEMPTS}-"


# SHA-256.


def test_a_matching_sha256_passes(server: Server, tmp_path: Path) -> None:
    body = pkl_bytes()
    url = server.serve("/model_final.pkl", body)
    path = web.download(url, tmp_path / "dl" / "model_final.pkl", sha(body))[0]
    assert path.read_bytes() == body


def test_a_sha256_mismatch_is_a_config_error_and_leaves_no_file(server: Server, tmp_path: Path) -> None:
    body = pkl_bytes()
    url = server.serve("/model_final.pkl", body)
    wanted = "0" * 64
    dest = tmp_path / "dl" / "model_final.pkl"
    with pytest.raises(ConfigError) as info:
        web.download(url, dest, wanted)[0]
    assert info.value.exit_code == EXIT_BAD_INPUT
    message = str(info.value)
    assert url in message and sha(body) in message and wanted in message
    assert leftovers(tmp_path / "dl") == []  # neither under the final name nor as .part


def test_a_kept_file_whose_sha256_differs_is_fetched_again(server: Server, tmp_path: Path) -> None:
    old, new = pt_bytes(tmp_path, size=3), pt_bytes(tmp_path, size=7)
    url = server.serve("/w.pt", new)
    dest = tmp_path / "dl" / "w.pt"
    dest.parent.mkdir()
    dest.write_bytes(old)  # a whole checkpoint, but not the one checkpointSha256 names
    assert web.download(url, dest, sha(new))[0].read_bytes() == new
    assert server.requests == [("GET", "/w.pt", None)]


# Corrupt files.


def test_an_html_page_served_as_a_checkpoint_is_refused_then_replaced(server: Server, tmp_path: Path) -> None:
    url = server.serve("/sam2.1_hiera_tiny.pt", HTML)
    dest = tmp_path / "dl" / "sam2.1_hiera_tiny.pt"
    with pytest.raises(ConfigError, match=re.escape(url) + ".*not a whole .pt checkpoint") as info:
        web.download(url, dest)[0]
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert leftovers(dest.parent) == []

    good = pt_bytes(tmp_path)
    server.files["/sam2.1_hiera_tiny.pt"] = good
    assert web.download(url, dest)[0].read_bytes() == good


@pytest.mark.parametrize("name", ["model_final.pkl", "w.pth", "m.safetensors"])
def test_an_html_page_is_refused_under_each_checkpoint_name(server: Server, tmp_path: Path, name: str) -> None:
    url = server.serve(f"/{name}", HTML)
    with pytest.raises(ConfigError, match="checkpoint"):
        web.download(url, tmp_path / "dl" / name)[0]


def test_an_html_page_is_refused_by_its_sha256_then_replaced(server: Server, tmp_path: Path) -> None:
    good = pt_bytes(tmp_path)
    url = server.serve("/w.pt", HTML)
    dest = tmp_path / "dl" / "w.pt"
    with pytest.raises(ConfigError, match=re.escape(url)):
        web.download(url, dest, sha(good))[0]
    assert leftovers(dest.parent) == []
    server.files["/w.pt"] = good
    assert web.download(url, dest, sha(good))[0].read_bytes() == good


def test_a_safetensors_cut_in_its_header_is_refused(server: Server, tmp_path: Path) -> None:
    body = safetensors_bytes(tmp_path)
    url = server.serve("/m.safetensors", body[:40])  # served whole (200, matching length), but cut short
    with pytest.raises(ConfigError, match="not a whole .safetensors checkpoint"):
        web.download(url, tmp_path / "dl" / "m.safetensors")[0]
    assert leftovers(tmp_path / "dl") == []


def test_a_safetensors_cut_in_its_data_is_refused(server: Server, tmp_path: Path) -> None:
    body = safetensors_bytes(tmp_path)
    url = server.serve("/m.safetensors", body[: len(body) - 1000])
    with pytest.raises(ConfigError):
        web.download(url, tmp_path / "dl" / "m.safetensors")[0]


def test_a_cut_pickle_is_refused(server: Server, tmp_path: Path) -> None:
    body = pkl_bytes()
    url = server.serve("/model_final.pkl", body[: len(body) // 2])
    with pytest.raises(ConfigError):
        web.download(url, tmp_path / "dl" / "model_final.pkl")[0]


def test_header_checks_under_final_names(tmp_path: Path) -> None:
    files = {
        "a.pt": pt_bytes(tmp_path),
        "legacy.pt": b"\x80\x02" + pickle.dumps({"w": 1}, protocol=2)[2:],
        "model_final.pkl": pkl_bytes(),
        "m.safetensors": safetensors_bytes(tmp_path),
    }
    bad = {
        "html.pt": HTML,
        "html.pkl": HTML,
        "html.safetensors": HTML,
        "cut.pt": files["a.pt"][:-30],  # the zip's central directory is gone
        "head.safetensors": files["m.safetensors"][:40],
        "tiny.safetensors": b"\x01\x00",
    }
    for name, data in {**files, **bad}.items():
        (tmp_path / name).write_bytes(data)
    assert [n for n in files if not web.looks_whole(tmp_path / n)] == []
    assert [n for n in bad if web.looks_whole(tmp_path / n)] == []


def test_a_bad_file_under_the_final_name_is_fetched_again(server: Server, tmp_path: Path) -> None:
    good = safetensors_bytes(tmp_path)
    url = server.serve("/m.safetensors", good)
    dest = tmp_path / "dl" / "m.safetensors"
    dest.parent.mkdir()
    dest.write_bytes(HTML)
    assert web.download(url, dest)[0].read_bytes() == good
    assert server.requests == [("GET", "/m.safetensors", None)]


@pytest.mark.parametrize("stale", ["older version", "html"])
def test_a_stale_part_that_is_not_a_prefix_of_the_file_is_replaced(server: Server, tmp_path: Path, stale: str) -> None:
    good = pt_bytes(tmp_path, size=2000)
    url = server.serve("/w.pt", good)
    dest = tmp_path / "dl" / "w.pt"
    dest.parent.mkdir()
    # Left by a killed job: the start of the file as it was before it was republished, or a page.
    old = pt_bytes(tmp_path, size=1500)[:3000] if stale == "older version" else HTML
    dest.with_name("w.pt.part").write_bytes(old)
    assert web.download(url, dest, sha(good) if stale == "older version" else None)[0].read_bytes() == good


# HTTP errors and an unreachable host.


@pytest.mark.parametrize(
    ("code", "hint"),
    [(404, "nothing is published there: check the URL"), (401, "credentials"), (403, "access is refused")],
)
def test_client_errors_are_config_errors_naming_the_url(server: Server, tmp_path: Path, code: int, hint: str) -> None:
    server.status["/w.pt"] = code
    url = f"{server.base}/w.pt"
    with pytest.raises(ConfigError) as info:
        web.download(url, tmp_path / "dl" / "w.pt")[0]
    assert info.value.exit_code == EXIT_BAD_INPUT
    message = str(info.value)
    assert url in message and f"HTTP {code}" in message and hint in message
    if code in (401, 403):
        assert "storage.mirror" in message
    assert len(server.requests) == 1  # no retry
    assert leftovers(tmp_path / "dl") == []


def test_a_server_error_is_retryable(server: Server, tmp_path: Path) -> None:
    server.status["/w.pt"] = 500
    url = f"{server.base}/w.pt"
    with pytest.raises(KubetuneError) as info:
        web.download(url, tmp_path / "dl" / "w.pt")[0]
    assert not isinstance(info.value, ConfigError)
    assert info.value.exit_code == EXIT_RETRYABLE
    assert url in str(info.value) and "HTTP 500" in str(info.value)


def test_an_unreachable_host_says_to_set_the_mirror(tmp_path: Path, monkeypatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/w.pt"
    with pytest.raises(ConfigError) as info:
        fetch_weights(weights(url), StorageSpec(), tmp_path / "cache", None)
    assert info.value.exit_code == EXIT_BAD_INPUT
    assert url in str(info.value) and "storage.mirror" in str(info.value)


# The node-shared cache.


def test_a_second_job_takes_the_file_from_the_shared_cache(server: Server, tmp_path: Path) -> None:
    body = pt_bytes(tmp_path)
    url = server.serve("/sam2.1_hiera_tiny.pt", body)
    shared = SharedFiles(tmp_path / "shared")
    first, _ = fetch_weights(weights(url, sha(body)), StorageSpec(), tmp_path / "job-a", shared)
    assert first.read_bytes() == body
    assert (tmp_path / "shared" / f"sha256-{sha(body)}").read_bytes() == body
    assert len(server.requests) == 1

    second, _ = fetch_weights(weights(url, sha(body)), StorageSpec(), tmp_path / "job-b", shared)
    assert second.is_relative_to(tmp_path / "job-b") and second.read_bytes() == body
    assert len(server.requests) == 1  # no request: the shared copy was checked and taken


def test_without_a_sha256_nothing_is_shared(server: Server, tmp_path: Path) -> None:
    body = pt_bytes(tmp_path)
    url = server.serve("/w.pt", body)
    shared = SharedFiles(tmp_path / "shared")
    fetch_weights(weights(url), StorageSpec(), tmp_path / "job-a", shared)
    fetch_weights(weights(url), StorageSpec(), tmp_path / "job-b", shared)
    assert len(server.requests) == 2 and not (tmp_path / "shared").exists()


def test_a_changed_shared_file_is_removed_and_downloaded_again(server: Server, tmp_path: Path) -> None:
    body = pt_bytes(tmp_path)
    url = server.serve("/w.pt", body)
    shared = SharedFiles(tmp_path / "shared")
    fetch_weights(weights(url, sha(body)), StorageSpec(), tmp_path / "job-a", shared)
    shared_file = tmp_path / "shared" / f"sha256-{sha(body)}"
    shared_file.write_bytes(pt_bytes(tmp_path, size=9))  # another whole checkpoint, not this one

    path, _ = fetch_weights(weights(url, sha(body)), StorageSpec(), tmp_path / "job-b", shared)
    assert path.read_bytes() == body
    assert len(server.requests) == 2  # detected and fetched again
    assert shared_file.read_bytes() == body  # and offered again, good this time
    assert leftovers(path.parent) == ["w.pt"]


# detectron2:// and storage.mirror.


def test_detectron2_uris_use_the_zoo_url(server: Server, tmp_path: Path, monkeypatch) -> None:
    body = pkl_bytes()
    server.serve("/COCO-InstanceSegmentation/x/model_final.pkl", body)
    monkeypatch.setenv("KUBETUNE_DETECTRON2_ZOO_URL", server.base + "/")
    uri = "detectron2://COCO-InstanceSegmentation/x/model_final.pkl"
    path, _ = fetch_weights(Weights(uri, "detectron2", "x", sha(body)), StorageSpec(), tmp_path / "cache", None)
    assert path.name == "model_final.pkl" and path.read_bytes() == body
    assert server.requests == [("GET", "/COCO-InstanceSegmentation/x/model_final.pkl", None)]


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_mirror_stands_in_for_the_url(server: Server, tmp_path: Path, scheme: str) -> None:
    body = pt_bytes(tmp_path)
    server.serve("/path/x.pt", body)
    host = server.base.removeprefix("http://")
    url = f"{scheme}://{host}/path/x.pt"
    mirror = f"file://{tmp_path}/mirror/"  # as written in a spec (Path.as_uri() would quote the ":")
    placed = tmp_path / "mirror" / scheme / host / "path" / "x.pt"
    assert mirrored(url, weights(url), mirror) == [f"file://{placed}"]
    placed.parent.mkdir(parents=True)
    placed.write_bytes(body)

    path, _ = fetch_weights(weights(url, sha(body)), StorageSpec(mirror=mirror), tmp_path / "cache", None)
    assert path.read_bytes() == body
    assert server.requests == []  # the URL itself is never asked

    with pytest.raises(ConfigError, match=re.escape(f"{mirror}{scheme}/{host}/path/x.pt") + ".*does not exist"):
        fetch_weights(weights(f"{url}.gone"), StorageSpec(mirror=mirror), tmp_path / "cache", None)
    with pytest.raises(ConfigError, match="SHA-256"):
        fetch_weights(weights(url, "0" * 64), StorageSpec(mirror=mirror), tmp_path / "cache", None)
    assert server.requests == []


def test_a_detectron2_uri_is_read_from_the_mirror(server: Server, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KUBETUNE_DETECTRON2_ZOO_URL", server.base + "/")
    body = pkl_bytes()
    placed = tmp_path / "mirror" / "detectron2" / "COCO-InstanceSegmentation" / "x" / "model_final.pkl"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(body)
    mirror = f"file://{tmp_path}/mirror"  # no trailing "/": one is added
    uri = "detectron2://COCO-InstanceSegmentation/x/model_final.pkl"
    path, _ = fetch_weights(Weights(uri, "detectron2", "x"), StorageSpec(mirror=mirror), tmp_path / "cache", None)
    assert path.read_bytes() == body and server.requests == []
