"""Checkpoints: manifest written last, newest complete one wins, keepLast prunes, sha verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubetune_trainer.checkpointing import Checkpointer
from kubetune_trainer.config import StorageSpec
from kubetune_trainer.errors import KubetuneError
from kubetune_trainer.storage import open_store


@pytest.fixture(params=["file", "s3"])
def output(request, tmp_path: Path):
    if request.param == "file":
        return open_store(f"file://{tmp_path}/out/", StorageSpec())
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/runs/x/", StorageSpec(endpoint=endpoint))


def keys(store) -> list[str]:
    return sorted(o.key for o in store.list())


def test_save_prune_and_latest(output, tmp_path: Path) -> None:
    ckpt = Checkpointer(output, tmp_path / "cache", keep_last=2)
    assert ckpt.latest() is None
    for step in (5, 10, 15):
        ckpt.save(step, {"step": step, "w": torch.full((3,), float(step))})
    assert ckpt.complete_steps() == [10, 15]
    assert keys(output) == [
        "checkpoints/step-00000010/manifest.json",
        "checkpoints/step-00000010/state.pt",
        "checkpoints/step-00000015/manifest.json",
        "checkpoints/step-00000015/state.pt",
    ]
    manifest = json.loads(output.get_bytes("checkpoints/step-00000015/manifest.json"))
    assert manifest["step"] == 15 and manifest["files"]["state.pt"]["bytes"] > 0
    state = ckpt.load(15)
    assert torch.equal(state["w"], torch.full((3,), 15.0))


def test_a_checkpoint_without_manifest_does_not_count(output, tmp_path: Path) -> None:
    ckpt = Checkpointer(output, tmp_path / "cache", keep_last=3)
    ckpt.save(4, {"w": torch.ones(1)})
    output.put_bytes(b"half an upload", "checkpoints/step-00000008/state.pt")  # crashed mid-save
    assert ckpt.latest() == 4
    ckpt.save(12, {"w": torch.zeros(1)})  # pruning removes the stale partial
    assert ckpt.complete_steps() == [4, 12]
    assert not [k for k in keys(output) if "00000008" in k]


def test_a_damaged_state_is_refused(output, tmp_path: Path) -> None:
    ckpt = Checkpointer(output, tmp_path / "cache", keep_last=1)
    ckpt.save(3, {"w": torch.ones(4)})
    output.put_bytes(b"tampered", "checkpoints/step-00000003/state.pt")
    with pytest.raises(KubetuneError, match="does not match its manifest"):
        ckpt.load(3)


def test_loads_refuse_pickled_code(output, tmp_path: Path) -> None:
    """weights_only=True: a checkpoint carrying arbitrary objects does not load."""

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    ckpt = Checkpointer(output, tmp_path / "cache", keep_last=1)
    ckpt.save(1, {"payload": Evil()})
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        ckpt.load(1)
