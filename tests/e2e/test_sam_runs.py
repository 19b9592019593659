"""SAM (v1, transformers) end to end: base weights from S3, 2-process torchrun, kill -9, resume,
the before → after report, and the result loading in `SamModel.from_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubetune.s3server import upload_tree

from tests.factories import job_manifest, on_fixed_set
from tests.helpers import complete_steps, kill_after_first_checkpoint, log_events, objects, write_tiny_sam

pytestmark = pytest.mark.slow


def sam_spec(source: str, output: str, endpoint: str | None, checkpoint: str, **training) -> dict:
    model = {"family": "sam", "variant": "vit-base", "imageSize": 64, "checkpoint": checkpoint}
    return job_manifest(source, output, endpoint, model=model, **training)


def download(s3, bucket: str, prefix: str, dest: Path) -> Path:
    for key in objects(s3, bucket, prefix):
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, prefix + key, str(dest / key))
    return dest


def test_two_process_sam_run_resumes_and_loads_in_transformers(
    start_run, s3, s3_endpoint: str, tiny_coco_s3: str, bucket: str, tmp_path: Path
) -> None:
    from transformers import SamModel, SamProcessor

    base = write_tiny_sam(tmp_path / "base")
    upload_tree(s3_endpoint, tmp_path / "base", bucket, "models/sam-tiny/")
    spec = sam_spec(
        tiny_coco_s3,
        f"s3://{bucket}/out/",
        s3_endpoint,
        f"s3://{bucket}/models/sam-tiny/",
        maxSteps=16,
        evalEvery=8,
        loss="otx",
    )
    spec["spec"]["output"]["checkpointEvery"] = 2
    env = {"KUBETUNE_METRICS_PORT": "0"}
    proc, log = start_run(spec, nproc=2, env=env, name="first")
    newest = kill_after_first_checkpoint(proc, log, s3, bucket, timeout_s=300)
    assert newest < 16 and not [k for k in objects(s3, bucket, "out/") if k.startswith("final/")]

    again, log2 = start_run(spec, nproc=2, env=env, name="second")
    assert again.wait(timeout=600) == 0, log2.read_text()[-3000:]
    events = log_events(log2.read_text())
    assert [e["step"] for e in events if e.get("event") == "resumed"] == [newest, newest]  # both ranks
    training = next(e for e in events if e.get("event") == "training")
    # otx trains the IoU head; box prompts never reach the point embeddings (and nothing trains them here).
    assert training["loss"] == "otx" and training["trainable"] == ["mask_decoder"] and training["frozen_unused"] == []

    report = json.loads(s3.get_object(Bucket=bucket, Key="out/report.json")["Body"].read())
    assert report["steps"] == 16 and report["family"] == "sam"
    evaluations = report["evaluations"]
    # The baseline (step 0) came from the first run and travelled in the checkpoint.
    assert report["baseline"] is not None and report["baseline"]["loss"] > evaluations[-1]["loss"], evaluations
    assert [row["metric"] for row in report["comparison"]] == ["f1", "dice", "miou"]
    for row in report["comparison"]:
        assert row["before"] == report["baseline"][row["metric"]] and row["after"] == evaluations[-1][row["metric"]]
    # otx switches early stopping on (f1, patience 10); 16 steps are too few for it to stop.
    assert report["best"]["metric"] == "f1" and not report["stopped_early"]
    summary = s3.get_object(Bucket=bucket, Key="out/summary.md")["Body"].read().decode()
    assert "| F1 |" in summary and "| mIoU |" in summary
    metrics = s3.get_object(Bucket=bucket, Key="out/metrics.jsonl")["Body"].read().decode().splitlines()
    steps = [json.loads(line)["step"] for line in metrics]
    assert steps == sorted(steps) and set(steps) == set(range(17))  # one history across the kill
    train_loss = [json.loads(line)["loss"] for line in metrics if "loss" in json.loads(line)]
    assert sum(train_loss[-4:]) < sum(train_loss[:4]), train_loss

    assert report["final_model"] == f"s3://{bucket}/out/final/model/"
    final = download(s3, bucket, "out/final/model/", tmp_path / "final")
    model = SamModel.from_pretrained(final)
    processor = SamProcessor.from_pretrained(final)
    assert processor.image_processor.size["longest_edge"] == 64
    state = model.state_dict()
    decoder = "mask_decoder.iou_prediction_head.proj_in.weight"
    assert decoder in state and not torch.equal(state[decoder], base[decoder])  # the decoder trained
    encoder = [k for k in base if k.startswith(("vision_encoder.", "prompt_encoder."))]
    assert encoder and all(torch.equal(state[k], base[k]) for k in encoder)  # frozen: the S3 base weights
    assert complete_steps(s3, bucket)[-1] == 16


def coco_to_datumaro(coco_root: Path, split: str, out: Path) -> None:
    """The COCO split as Datumaro JSON (annotations/<split>.json + images/<split>/): polygons of
    one object share a group, RLE masks become mask annotations."""
    coco = json.loads((coco_root / split / "annotations.json").read_text())
    (out / "images" / split).mkdir(parents=True)
    items = {}
    for image in coco["images"]:
        (out / "images" / split / image["file_name"]).write_bytes((coco_root / split / image["file_name"]).read_bytes())
        items[image["id"]] = {
            "id": Path(image["file_name"]).stem,
            "image": {"path": image["file_name"]},
            "annotations": [],
        }
    for n, ann in enumerate(coco["annotations"], start=1):
        seg, anns = ann["segmentation"], items[ann["image_id"]]["annotations"]
        if isinstance(seg, dict):
            anns.append({"id": n, "type": "mask", "group": 0, "label_id": 0, "rle": seg})
        else:
            anns += [{"id": n, "type": "polygon", "group": n, "label_id": 0, "points": p} for p in seg]
    (out / "annotations").mkdir(exist_ok=True)
    categories = {"label": {"labels": [{"name": "shape", "parent": "", "attributes": []}], "attributes": []}}
    (out / "annotations" / f"{split}.json").write_text(
        json.dumps({"categories": categories, "items": list(items.values())})
    )


def test_point_prompts_on_datumaro_with_a_trainable_prompt_encoder(start_run, tiny_coco: Path, tmp_path: Path) -> None:
    """Under DDP every trainable parameter needs a gradient: point prompts never reach the box
    corner embeddings, so the run freezes them instead of hanging."""
    data = tmp_path / "datumaro"
    for split in ("train", "val"):
        coco_to_datumaro(tiny_coco, split, data)
    write_tiny_sam(tmp_path / "base")
    spec = sam_spec(
        f"file://{data}/", f"file://{tmp_path}/out/", None, f"file://{tmp_path}/base", maxSteps=4, loss="sam2"
    )
    spec["spec"]["model"].update(
        trainable=["mask_decoder", "prompt_encoder"], multimaskReduction="mean", featureCache="disk"
    )
    spec["spec"]["data"].update(
        format="datumaro", train="train", validation="val", prompts={"type": "points", "positivePoints": 2}
    )
    proc, log = start_run(spec, nproc=2, env={"KUBETUNE_METRICS_PORT": "0"})
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    training = next(e for e in log_events(log.read_text()) if e.get("event") == "training")
    assert training["frozen_unused"] == ["box"] and training["samples"] == 8
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"] == 4 and len(report["comparison"]) == 3
    assert report["evaluations"][0]["objects"] == report["evaluations"][-1]["objects"] > 0
    # Rank 0's share of train and validation images, each encoded once: the final evaluation and
    # the second epoch's unflipped images came from the node's disk cache.
    cache = report["feature_cache"]
    assert cache["mode"] == "disk" and cache["hits"] >= 2 and cache["misses"] <= 4 * 2 + 2


def test_sam_learns_a_fixed_tiny_dataset(start_run, tiny_coco: Path, tmp_path: Path) -> None:
    """DiceCE on the mask decoder fits eight images; the base model is the tiny random SAM, so
    only a fixed dataset shows it (mIoU about 0.07 -> 0.25 in 200 steps)."""
    write_tiny_sam(tmp_path / "base")
    spec = sam_spec(
        f"file://{tiny_coco}/", f"file://{tmp_path}/out/", None, f"file://{tmp_path}/base", maxSteps=200, evalEvery=100
    )
    spec["spec"]["training"].update(batchSize=4)
    proc, log = start_run(on_fixed_set(spec), env={"KUBETUNE_METRICS_PORT": "0"})
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {row["metric"]: row for row in report["comparison"]}
    assert rows["miou"]["change"] > 0.1 and rows["dice"]["change"] > 0.1, report["comparison"]
    assert report["evaluations"][-1]["loss"] < report["baseline"]["loss"]
