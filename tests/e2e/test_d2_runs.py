"""Detectron2 jobs end to end: real torchrun processes, a real S3 endpoint, kill -9 and resume,
COCO AP, the Prometheus names, and a final model that DefaultPredictor loads.

detectron2 is not on PyPI; where it is not installed these tests are skipped and say how to get it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from kubetune.s3server import upload_tree
from kubetune_trainer.d2.build import INSTALL_HINT, require_detectron2
from kubetune_trainer.errors import ConfigError
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import job_manifest
from tests.helpers import (
    DOCUMENTED,
    free_port_run,
    kill_after_first_checkpoint,
    launcher_of,
    log_events,
    objects,
    remove_bucket,
    scrape,
    serve_files,
    wait_while_running,
)

try:
    import detectron2  # noqa: F401

    HAVE_D2 = True
except ImportError:
    HAVE_D2 = False
needs_d2 = pytest.mark.skipif(not HAVE_D2, reason="detectron2 is not installed (not on PyPI): " + INSTALL_HINT)
# Mask R-CNN R50-FPN with GroupNorm: the zoo's recipe for random init (FrozenBN would diverge).
VARIANT = "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml"
SMALL = {
    "INPUT.MIN_SIZE_TRAIN": [96],
    "INPUT.MAX_SIZE_TRAIN": 128,
    "INPUT.MIN_SIZE_TEST": 96,
    "INPUT.MAX_SIZE_TEST": 128,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 100,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,  # random weights: keep every detection, so AP is a number
}
LOSSES = ("loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")


def d2_spec(source: str, train: str, validation: str | None, fmt: str, out: str, endpoint: str, **training) -> dict:
    """A small Mask R-CNN job: one image per process, fp32, the sizes of SMALL."""
    return job_manifest(
        source,
        out,
        endpoint,
        name="d2",
        model={"family": "detectron2", "variant": VARIANT, "overrides": SMALL},
        data={"format": fmt, "train": train, "validation": validation, "numWorkers": 1},
        outputs={"checkpointEvery": None, "keepLast": None},
        **{"maxSteps": None, "evalEvery": None, "batchSize": 1, "optimizer": {"lr": 0.005}, **training},
    )


def test_missing_detectron2_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "detectron2", None)  # what an absent package looks like to import
    with pytest.raises(ConfigError) as err:
        require_detectron2()
    assert "uv sync --extra detectron2" in str(
        err.value
    ) and "git+https://github.com/facebookresearch/detectron2" in str(err.value)
    assert err.value.exit_code == 2


@needs_d2
@pytest.mark.slow
def test_mask_rcnn_two_processes_kill_9_resume(start_run, s3, s3_endpoint, tiny_coco_s3, bucket, tmp_path) -> None:
    port = free_port_run(2)
    spec = d2_spec(
        tiny_coco_s3,
        "train/annotations.json",
        "val/annotations.json",
        "coco",
        f"s3://{bucket}/out/",
        s3_endpoint,
        maxSteps=8,
        evalEvery=4,
    )
    spec["spec"]["output"]["checkpointEvery"] = 2
    env = {"KUBETUNE_METRICS_PORT": str(port)}
    proc, log = start_run(spec, nproc=2, env=env, name="first")
    killed_at = kill_after_first_checkpoint(proc, log, s3, bucket, timeout_s=600)
    assert killed_at < 8 and not any(k.startswith("final/") for k in objects(s3, bucket, "out/"))

    proc, log = start_run(spec, nproc=2, env=env, name="second")
    seen = None
    while proc.poll() is None:
        text = scrape(port)
        if text and 'component="loss_mask"' in text and "kubetune_eval_metric{" in text:
            seen = text
        time.sleep(0.5)
    text_log = log.read_text()
    assert proc.returncode == 0, text_log[-4000:]
    resumed = [json.loads(line) for line in text_log.splitlines() if line.startswith("{") and '"resumed"' in line]
    assert resumed and resumed[0]["step"] == killed_at  # the newest checkpoint, not a fresh start

    keys = objects(s3, bucket, "out/")
    for name in ("final/model_final.pth", "final/config.yaml", "final/classes.json", "metrics.json", "metrics.jsonl"):
        assert name in keys
    assert "checkpoints/step-00000008/manifest.json" in keys
    assert any(k.startswith("checkpoints/step-00000008/visualizations/") and k.endswith(".png") for k in keys)
    report = json.loads(s3.get_object(Bucket=bucket, Key="out/report.json")["Body"].read())
    assert report["steps"] == 8 and report["classes"] == ["shape"]
    final_eval = report["evaluations"][-1]
    assert final_eval["step"] == 8 and 0.0 <= final_eval["bbox_ap"] <= 1.0 and 0.0 <= final_eval["segm_ap"] <= 1.0
    assert report["best"]["metric"] == "segm_ap"
    # As for every family: the base model evaluated before training, the comparison, summary.md.
    first = report["evaluations"][0]
    assert first["step"] == 0 and report["baseline"] == {k: v for k, v in first.items() if k != "step"}
    assert report["final"] == {k: v for k, v in final_eval.items() if k != "step"} and "summary.md" in keys
    assert "final/last_checkpoint" not in keys  # Detectron2's own pointer file stays behind
    # Before/after: the Visualizer's ground truth, base model and fine-tuned rows for every validation
    # image (the base panels kept across the kill), and the page; COCO's per-size APs by name.
    assert [k for k in keys if k.startswith("report/")] == [
        "report/config.json",
        *[f"report/gallery/0000{i}.png" for i in range(4)],
        "report/report.html",
    ]
    assert "could not refresh the report" not in text_log
    assert {f"size/{s}/segm_ap" for s in ("small", "medium", "large")} <= set(final_eval)
    page = s3.get_object(Bucket=bucket, Key="out/report/report.html")["Body"].read().decode()
    assert "Did fine-tuning help?" in page and "mask AP" in page and page.count("data:image/png;base64,") == 4

    # One continuous metric history across the kill: every step 1..8 has its loss once.
    rows = [json.loads(line) for line in s3.get_object(Bucket=bucket, Key="out/metrics.jsonl")["Body"].iter_lines()]
    assert sorted(r["step"] for r in rows if "loss" in r) == list(range(1, 9))

    # Rank 0 serves the documented names, with Detectron2's per-loss series.
    assert seen is not None, "rank 0 served no evaluation metrics during the resumed run"
    samples = [s for fam in text_string_to_metric_families(seen) for s in fam.samples]
    expected = {"family": "detectron2", "job": "d2", "namespace": "tests", "rank": "0"}
    for name in DOCUMENTED:
        assert any(s.name == name and expected.items() <= s.labels.items() for s in samples), name
    components = {s.labels.get("component") for s in samples if s.name == "kubetune_train_loss_component"}
    assert set(LOSSES) <= components

    predict_with_default_predictor(s3, bucket, tmp_path)


def predict_with_default_predictor(s3, bucket: str, tmp_path: Path) -> None:
    """The published folder is what DefaultPredictor needs: config.yaml beside model_final.pth."""
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    folder = tmp_path / "final"
    folder.mkdir()
    for name in ("model_final.pth", "config.yaml"):
        s3.download_file(bucket, f"out/final/{name}", str(folder / name))
    cfg = get_cfg()
    cfg.merge_from_file(str(folder / "config.yaml"))
    cfg.MODEL.WEIGHTS = str(folder / cfg.MODEL.WEIGHTS)
    cfg.MODEL.DEVICE = "cpu"
    predictor = DefaultPredictor(cfg)
    image = np.asarray(Image.new("RGB", (96, 96), (30, 160, 90)))[:, :, ::-1]
    instances = predictor(image)["instances"]
    assert instances.image_size == (96, 96) and instances.has("pred_masks")


def coco_to_via(coco_file: Path, via_file: Path) -> None:
    """The balloon tutorial's layout: {key: {filename, size, regions: {i: {shape_attributes, ...}}}}."""
    coco = json.loads(coco_file.read_text())
    entries = {}
    for image in coco["images"]:
        regions = {}
        for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            if not isinstance(ann["segmentation"], list):  # VIA has polygons only; skip the RLE ones
                continue
            points = ann["segmentation"][0]
            shape = {"name": "polygon", "all_points_x": points[0::2], "all_points_y": points[1::2]}
            regions[str(len(regions))] = {"shape_attributes": shape, "region_attributes": {"class": "shape"}}
        entries[image["file_name"]] = {"filename": image["file_name"], "size": 0, "regions": regions}
    via_file.write_text(json.dumps(entries))


@needs_d2
@pytest.mark.slow
def test_via_dataset_single_process(start_run, s3, s3_endpoint, tiny_coco: Path, bucket, tmp_path) -> None:
    root = tmp_path / "via"
    (root / "train").mkdir(parents=True)
    for image in (tiny_coco / "train").glob("*.jpg"):
        (root / "train" / image.name).write_bytes(image.read_bytes())
    coco_to_via(tiny_coco / "train" / "annotations.json", root / "train" / "via_region_data.json")
    upload_tree(s3_endpoint, root, bucket, "via/")
    spec = d2_spec(
        f"s3://{bucket}/via/", "train/via_region_data.json", None, "via", f"s3://{bucket}/out/", s3_endpoint, maxSteps=2
    )
    proc, log = start_run(spec, env={"KUBETUNE_METRICS_PORT": "0"})
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    report = json.loads(s3.get_object(Bucket=bucket, Key="out/report.json")["Body"].read())
    assert report["steps"] == 2 and report["classes"] == ["shape"] and report["evaluations"] == []


@needs_d2
def test_unknown_override_fails_before_writing(start_run, s3, s3_endpoint, tiny_coco_s3, bucket, tmp_path) -> None:
    spec = d2_spec(tiny_coco_s3, "train/annotations.json", None, "coco", f"s3://{bucket}/out/", s3_endpoint, maxSteps=2)
    spec["spec"]["model"]["overrides"] = {"SOLVER.BASE_LRR": 0.1}
    term = tmp_path / "termination-log"
    proc, log = start_run(spec, env={"KUBETUNE_TERMINATION_LOG": str(term), "KUBETUNE_METRICS_PORT": "0"})
    assert proc.wait(timeout=300) == 2, log.read_text()[-3000:]
    assert "SOLVER.BASE_LRR is not a Detectron2 config key (did you mean SOLVER.BASE_LR?)" in log.read_text()
    assert objects(s3, bucket, "out/") == []


@needs_d2
@pytest.mark.slow
def test_an_omitted_checkpoint_starts_from_the_zoo_weights(start_run, tiny_coco: Path, tmp_path) -> None:
    """As Detectron2's tutorial: the zoo's weights for the config, through detectron2:// (served here
    on loopback in the zoo's layout), heads that do not fit the job's classes re-initialised and named."""
    import pickle

    from detectron2 import model_zoo

    zoo_path = model_zoo.get_checkpoint_url(VARIANT).removeprefix("https://dl.fbaipublicfiles.com/detectron2/")
    zoo = tmp_path / "zoo"
    (zoo / zoo_path).parent.mkdir(parents=True)
    coco_heads = {  # COCO's 80 classes, as the zoo's checkpoints hold them; the backbone stem fits
        "roi_heads.box_predictor.cls_score.weight": np.zeros((81, 1024), np.float32),
        "roi_heads.box_predictor.cls_score.bias": np.zeros(81, np.float32),
        "roi_heads.mask_head.predictor.weight": np.zeros((80, 256, 1, 1), np.float32),
        "backbone.bottom_up.stem.conv1.weight": np.full((64, 3, 7, 7), 0.01, np.float32),
    }
    (zoo / zoo_path).write_bytes(pickle.dumps({"model": coco_heads, "__author__": "Detectron2 Model Zoo"}, 4))
    spec = d2_spec(tiny_coco.as_uri(), "train/annotations.json", None, "coco", (tmp_path / "out").as_uri(), None)
    spec["spec"]["model"].pop("checkpoint")
    spec["spec"]["training"] = {"maxSteps": 2, "batchSize": 1, "precision": "fp32"}  # the zoo's lr, scaled
    with serve_files(zoo) as (base, seen):
        proc, log = start_run(spec, env={"KUBETUNE_METRICS_PORT": "0", "KUBETUNE_DETECTRON2_ZOO_URL": base + "/"})
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    assert seen == [("GET", "/" + zoo_path)]
    events = {e.get("event"): e for e in log_events(log.read_text())}
    assert events["base weights: the model zoo's for the config"]["checkpoint"] == f"detectron2://{zoo_path}"
    loaded = events["base weights loaded"]
    assert set(loaded["reinitialised_for_shape"]) == {
        "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.box_predictor.cls_score.bias",
        "roi_heads.mask_head.predictor.weight",
    }
    assert "backbone.bottom_up.stem.conv1.weight" not in loaded["missing"] and loaded["missing"]
    assert events["training"]["base_lr"] == pytest.approx(0.02 * 1 / 16)  # the zoo's 0.02 for 16 images


@needs_d2
def test_config_snapshot_matches_installed_detectron2() -> None:
    """detectron2_config.json (what validates overrides without detectron2) is what detectron2 says;
    regenerate it with `python -m kubetune_trainer.d2.schema` after moving the pin."""
    from detectron2.structures import BoxMode
    from kubetune_trainer.config import detectron2_keys
    from kubetune_trainer.d2 import datasets, schema

    assert schema.generate() == detectron2_keys.snapshot()
    assert datasets.XYXY_ABS == BoxMode.XYXY_ABS


@needs_d2
@pytest.mark.slow
def test_sigterm_checkpoints_the_iteration_reached_and_exits_3(start_run, tiny_coco: Path, tmp_path) -> None:
    """The kubelet's SIGTERM to the launcher mid-run: both ranks stop after the same iteration,
    it is checkpointed (no final evaluation on the way out), the pod exits 3, the retry resumes there."""
    out = tmp_path / "out"
    spec = d2_spec(
        tiny_coco.as_uri(), "train/annotations.json", "val/annotations.json", "coco", out.as_uri() + "/", None,
        maxSteps=200, evalEvery=1000,
    )  # fmt: skip
    spec["spec"]["output"]["checkpointEvery"] = 1000
    proc, log = start_run(spec, nproc=2, env={"KUBETUNE_METRICS_PORT": "0"}, name="preempted")
    wait_while_running(proc, log, lambda: '"event": "training"' in log.read_text())
    time.sleep(4)
    os.kill(launcher_of(proc.pid), signal.SIGTERM)
    assert proc.wait(timeout=120) == 3, log.read_text()[-3000:]
    preempted = [e for e in log_events(log.read_text()) if e.get("event") == "preempted"]
    assert len(preempted) == 2 and len({e["step"] for e in preempted}) == 1
    step = preempted[0]["step"]
    assert [p.parent.name for p in (out / "checkpoints").glob("*/manifest.json")] == [f"step-{step:08d}"]
    assert '"event": "evaluation"' not in log.read_text().split('"event": "training"')[1]
    proc, log = start_run(spec, nproc=2, env={"KUBETUNE_METRICS_PORT": "0"}, name="resumed")
    wait_while_running(proc, log, lambda: '"event": "resumed"' in log.read_text())
    resumed = [e for e in log_events(log.read_text()) if e.get("event") == "resumed"]
    assert resumed[0]["step"] == step  # iterations lost: 0


@needs_d2
@pytest.mark.slow
def test_a_failure_on_one_rank_ends_every_rank_promptly(start_run, s3, s3_endpoint, tiny_coco_s3, bucket) -> None:
    """Rank 0's checkpoint fails (its output bucket is gone) while rank 1 is in the next
    iteration: rank 0 must not go on into the final evaluation or a barrier (Detectron2 runs its
    after_train hooks on the way out), so the whole run ends at once with rank 0's reason."""
    s3.create_bucket(Bucket=f"{bucket}-out")
    spec = d2_spec(tiny_coco_s3, "train/annotations.json", "val/annotations.json", "coco", f"s3://{bucket}-out/run/",
                   s3_endpoint, maxSteps=200, evalEvery=1000)  # fmt: skip
    spec["spec"]["output"]["checkpointEvery"] = 2
    proc, log = start_run(spec, nproc=2, env={"KUBETUNE_METRICS_PORT": "0"}, name="fault")
    wait_while_running(
        proc, log, lambda: s3.list_objects_v2(Bucket=f"{bucket}-out", Prefix="run/checkpoints/")["KeyCount"]
    )
    remove_bucket(s3, f"{bucket}-out")  # under the running job
    fault = time.time()
    code = proc.wait(timeout=180)
    assert code == 2, log.read_text()[-3000:]
    assert time.time() - fault < 60
    failed = [e for e in log_events(log.read_text()) if e.get("event") == "training failed"]
    assert any(e["rank"] == 0 and "does not exist" in e["reason"] for e in failed)
