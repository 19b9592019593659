"""What many tests share besides fixtures: ports, run logs, S3 listings, scrapes, tiny models."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import torch
from kubetune.local import kill_tree

from tests.factories import train_config

ROOT = Path(__file__).resolve().parents[1]
# What every trainer rank exports (docs/architecture.md), as the exposition names a scrape shows.
DOCUMENTED = [
    "kubetune_train_loss",
    "kubetune_train_step",
    "kubetune_train_epoch",
    "kubetune_train_learning_rate",
    "kubetune_train_images_per_second",
    "kubetune_train_images_total",
    "kubetune_train_step_seconds_bucket",
    "kubetune_data_wait_seconds_bucket",
    "kubetune_eval_metric",
    "kubetune_amp_skipped_steps_total",
    "kubetune_checkpoint_seconds_bucket",
    "kubetune_checkpoint_last_step",
    "kubetune_s3_bytes_total",
]


def free_port_run(count: int) -> int:
    """A base port with `count` consecutive free ports (ranks serve /metrics on base + local
    rank). Drawn below the kernel's ephemeral range, where client sockets of the same test
    (boto3, torchrun's rendezvous) would otherwise take base + 1 now and then."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        sockets = [socket.socket() for _ in range(count)]
        try:
            for offset, sock in enumerate(sockets):
                sock.bind(("", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports in 20000-32000")


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return resp.read().decode()
    except OSError:
        return None


def log_events(text: str) -> list[dict]:
    """The JSON log events of a run; with several ranks on one pipe two events can share a line."""
    decoder = json.JSONDecoder()
    events = []
    for line in text.splitlines():
        pos = line.find("{")
        while pos != -1:
            try:
                event, end = decoder.raw_decode(line, pos)
            except json.JSONDecodeError:
                break
            events.append(event)
            pos = line.find("{", end)
    return events


def objects(s3, bucket: str, prefix: str) -> list[str]:
    return sorted(o["Key"][len(prefix) :] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def complete_steps(s3, bucket: str) -> list[int]:
    return sorted(int(k.split("/")[1][5:]) for k in objects(s3, bucket, "out/") if k.endswith("manifest.json"))


def kill_after_first_checkpoint(proc, log: Path, s3, bucket: str, timeout_s: int) -> int:
    """kill -9 the whole run as soon as a complete checkpoint exists; returns its newest step."""
    deadline = time.time() + timeout_s
    while not complete_steps(s3, bucket):
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.time() < deadline, f"no checkpoint within {timeout_s} s"
        time.sleep(0.1)
    kill_tree(proc.pid)
    proc.wait()
    return complete_steps(s3, bucket)[-1]


def make_trainer(root: Path, precision: str, accumulation: int = 1):
    """The SAM2 loop of a real run (tiny model, 64 px, three steps) over the COCO set at `root`."""
    from kubetune_trainer.promptable.data import Preprocess
    from kubetune_trainer.promptable.models.sam2 import Sam2Segmenter
    from kubetune_trainer.promptable.recipe import build_loader, build_trainer
    from kubetune_trainer.training.distributed import init

    from tests.factories import usable

    config = train_config(root, precision=precision, gradAccumulation=accumulation)
    ctx = init()
    torch.manual_seed(0)
    model = Sam2Segmenter().build(config.model, None)
    loader = build_loader(usable("coco", root, "train/annotations.json"), config, ctx, Preprocess(64))
    return build_trainer(model, loader, config, ctx, total_steps=3)


def write_tiny_sam(folder: Path, seed: int = 123) -> dict:
    """A transformers SamModel folder (config.json + model.safetensors) with a 64 px input and
    32-wide layers: the real architecture at a size that trains on a CPU in seconds."""
    from kubetune_trainer.promptable.models.sam import reset_positional_encoding
    from transformers import SamConfig, SamModel

    config = SamConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "global_attn_indexes": [1],
            "image_size": 64,
            "patch_size": 8,
            "window_size": 4,
            "output_channels": 32,
            "num_pos_feats": 16,
            "mlp_dim": 64,
            "initializer_range": 0.02,
        },
        prompt_encoder_config={"hidden_size": 32, "image_size": 64, "patch_size": 8, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    )
    torch.manual_seed(seed)
    model = SamModel(config)
    reset_positional_encoding(model)
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def make_base_weights(path: Path) -> dict:
    """A Meta-format checkpoint unlike the trainer's own seeded init (seed 123, not 0)."""
    import torch
    from kubetune_trainer.config import ModelSpec
    from kubetune_trainer.promptable.models.sam2 import Sam2Segmenter

    torch.manual_seed(123)
    model = Sam2Segmenter().build(ModelSpec(family="sam2", variant="sam2.1_hiera_tiny", imageSize=64), None)
    segmenter = Sam2Segmenter()
    segmenter.save_native(model, path.parent)
    (path.parent / segmenter.native_name).rename(path)
    return model.sam.state_dict()


@contextmanager
def serve_files(folder: Path):
    """A loopback HTTP server for `folder` (whole files: http.server ignores Range):
    yields (base URL, the list of (method, path) it was asked for)."""
    import http.server
    import threading

    seen: list[tuple[str, str]] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def send_head(self):
            seen.append((self.command, self.path))
            return super().send_head()

        def log_message(self, *args) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


class FlakyProxy:
    """A loopback TCP proxy in front of an endpoint that can be taken down for a while: while
    down it accepts and at once closes connections (as a restarting load balancer does)."""

    def __init__(self, target: str) -> None:
        import socket
        from urllib.parse import urlparse

        parsed = urlparse(target)
        self.target = (parsed.hostname, parsed.port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.down_until = 0.0
        self.refused = 0
        self.closing = False

    def down_for(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds

    def __enter__(self) -> FlakyProxy:
        import threading

        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing = True
        self.server.close()

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closing:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # a reset
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with suppress(OSError):
                    sock.close()


def wait_while_running(proc, log: Path, done: Callable[[], object], timeout_s: float = 300) -> None:
    """Poll `done()` while the `kubetune run` process lives; fail with its log if it ends first."""
    deadline = time.time() + timeout_s
    while not done():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def launcher_of(pid: int) -> int:
    """The one child of `kubetune run --local`: the launcher, what the kubelet signals as PID 1."""
    (child,) = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return child


def remove_bucket(s3, name: str, tries: int = 100) -> None:
    """Empty and delete a bucket a running job may still be writing to."""
    for _ in range(tries):
        for obj in s3.list_objects_v2(Bucket=name).get("Contents", []):
            s3.delete_object(Bucket=name, Key=obj["Key"])
        try:
            s3.delete_bucket(Bucket=name)
            return
        except s3.exceptions.ClientError:  # an upload landed in between
            time.sleep(0.1)
    raise AssertionError(f"bucket {name} could not be removed")


CHROMIUM = shutil.which("chromium")


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 2400) -> Path:
    """A screenshot of a local page in Debian's headless chromium (no network, fresh profile)."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make system-deps` installs it as root)")
    profile = png.parent / "chromium-profile"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        f"--screenshot={png}",
    ]
    done = subprocess.run([CHROMIUM, *flags, page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert png.is_file(), done.stderr[-2000:]
    return png


def drawn_share(png: Path) -> tuple[float, int]:
    """(share of pixels that are not white, number of distinct colours) of a screenshot."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return float((pixels < 245).any(axis=1).mean()), len(np.unique(pixels, axis=0))
