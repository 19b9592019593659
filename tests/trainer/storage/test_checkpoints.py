"""Checkpoints: manifest written last, newest complete one wins, keepLast prunes, sha verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubetune_trainer.config import StorageSpec
from kubetune_trainer.errors import KubetuneError
from kubetune_trainer.storage.checkpoints import Checkpointer
from kubetune_trainer.storage.stores import open_store
from structlog.testing import capture_logs


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
    if output.uri.startswith("file://"):  # a pruned checkpoint leaves no empty folder behind
        assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == [
            "step-00000010",
            "step-00000015",
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


def test_the_metric_log_inside_a_checkpoint_ends_at_its_step(tiny_coco: Path, tmp_path: Path) -> None:
    """A kill right after a checkpoint completes must not lose history: the log the resumed run
    continues is the one inside the checkpoint, and it already holds the checkpoint step's row."""
    from kubetune_trainer.metrics.events import JsonlWriter
    from kubetune_trainer.promptable.hooks import CheckpointHook, WriterHook

    from tests.helpers import make_trainer

    store = open_store(f"file://{tmp_path}/out/", StorageSpec())
    ckpt = Checkpointer(store, tmp_path / "cache", keep_last=5)
    trainer = make_trainer(tiny_coco, "fp32")
    log = tmp_path / "metrics.jsonl"
    writer = WriterHook([JsonlWriter(log)])
    trainer.hooks += [
        CheckpointHook(ckpt, every=2, is_writer=True, extras={"metrics.jsonl": log}, before_save=writer.flush),
        writer,
    ]
    trainer.train()

    assert ckpt.complete_steps() == [2, 3]
    inside = tmp_path / "restored.jsonl"
    assert ckpt.fetch_extra(2, "metrics.jsonl", inside)
    rows = [json.loads(line) for line in inside.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # step 2's own row is there
    assert max(r["step"] for r in rows) == 2  # and nothing from later steps
    final = [json.loads(line) for line in log.read_text().splitlines()]
    assert final[-1]["step"] == 3 and final[-1]["checkpoint/last_step"] == 3


def test_a_checkpoint_in_the_earlier_layout_resumes(tiny_coco: Path) -> None:
    """The state keys are a contract (docs/architecture.md): a checkpoint written before the
    loop and its hooks were split (no `amp` entry; early stopping beside the position) resumes."""
    from kubetune_trainer.promptable.hooks import EvalHook

    from tests.helpers import make_trainer

    written = make_trainer(tiny_coco, "fp32").state_dict()
    earlier = {k: v for k, v in written.items() if k not in ("amp", "early_stopping")}
    earlier["position"] = {"step": 2, "epoch": 0, "batches_in_epoch": 2}
    earlier["early_stopping"] = {"best": 0.4, "evals_without_improvement": 1, "baseline": {"miou": 0.1}}
    trainer = make_trainer(tiny_coco, "fp32")
    hook = EvalHook(10, lambda: {"miou": 0.5}, None)
    trainer.hooks.append(hook)
    trainer.load_state_dict(earlier)
    assert (trainer.state.step, trainer.batches.epoch, trainer.batches.taken, trainer.state.skipped_steps) == (
        2,
        0,
        2,
        0,
    )
    assert hook.baseline == {"miou": 0.1} and (hook.tracker.best, hook.tracker.without_improvement) == (0.4, 1)
    assert trainer.state_dict()["early_stopping"] == earlier["early_stopping"]  # written back the same way


def test_resume_falls_back_past_unusable_checkpoints_and_says_why(output, tmp_path: Path) -> None:
    """The newest is damaged, the next one's state refuses to load, the one before that has a
    tampered metric log: the one before all three is where training resumes."""

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    ckpt = Checkpointer(output, tmp_path / "cache", keep_last=5)
    log_file = tmp_path / "metrics.jsonl"
    for step in (2, 4, 6, 8):
        log_file.write_text(f'{{"step": {step}}}\n')
        ckpt.save(step, {"w": torch.full((3,), float(step))} if step != 6 else {"x": Evil()}, {log_file.name: log_file})
    output.put_bytes(b"damaged in storage", "checkpoints/step-00000008/state.pt")
    output.put_bytes(b'{"step": 99}\n', "checkpoints/step-00000004/metrics.jsonl")
    with capture_logs() as logs:
        assert ckpt.newest_usable() == 2
    assert ckpt.load(2)["w"].tolist() == [2.0, 2.0, 2.0]
    skipped = {e["step"]: e["reason"] for e in logs if e["event"] == "checkpoint unusable, trying an older one"}
    assert list(skipped) == [8, 6, 4]
    assert "does not match its manifest" in skipped[8] and "Weights only load failed" in skipped[6]
    assert "metrics.jsonl does not match its manifest" in skipped[4]
    with pytest.raises(KubetuneError, match="metrics.jsonl does not match its manifest"):
        ckpt.fetch_extra(4, "metrics.jsonl", tmp_path / "copy.jsonl")
    assert Checkpointer(output, tmp_path / "other", keep_last=5).newest_usable() == 2  # from any cache


def test_no_usable_checkpoint_starts_afresh(output, tmp_path: Path) -> None:
    ckpt = Checkpointer(output, tmp_path / "cache", keep_last=2)
    assert ckpt.newest_usable() is None
    ckpt.save(1, {"w": torch.ones(1)})
    output.put_bytes(b"{not json", "checkpoints/step-00000001/manifest.json")
    assert ckpt.newest_usable() is None


def test_uploads_a_killed_writer_left_are_aborted(s3, s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    output = open_store(f"s3://{bucket}/runs/x/", StorageSpec(endpoint=s3_endpoint))
    key = "runs/x/checkpoints/step-00000004/state.pt"
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * (5 << 20))
    s3.create_multipart_upload(Bucket=bucket, Key="runs/other/data.bin")  # not the checkpoints': kept
    ckpt = Checkpointer(output, tmp_path / "cache", keep_last=2)
    assert ckpt.newest_usable() is None
    left = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["runs/other/data.bin"]
