"""The detectron2-free side of the Detectron2 family: schema checks, spec rules, the config mapping,
VIA/VOC readers, the metrics bridge and the resumable stream. Nothing here imports detectron2."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from itertools import islice

import pytest
import yaml
from kubetune_trainer.config import SAM2_DEFAULTS, OptimizerSpec, TrainParameters, describe_validation_error
from kubetune_trainer.config.detectron2_keys import check_overrides, check_variant
from kubetune_trainer.d2.bridge import RunShape, bridge
from kubetune_trainer.d2.plan import DatasetFacts, plan
from kubetune_trainer.d2.sampler import ResumableStream
from kubetune_trainer.errors import ConfigError
from pydantic import ValidationError

from tests.helpers import ROOT

VARIANT = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
ZOO = {"SOLVER.BASE_LR": 0.02, "SOLVER.IMS_PER_BATCH": 16, "SOLVER.WARMUP_ITERS": 1000, "SOLVER.STEPS": (21000, 25000)}
FACTS = DatasetFacts(train_images=50, num_classes=3, has_rle=False, has_validation=False)


def d2_params(model: dict | None = None, data: dict | None = None, **training) -> dict:
    return {
        "model": {"family": "detectron2", "variant": VARIANT, **(model or {})},
        "data": {"source": "file:///data/", "format": "via", "train": "train/via.json", **(data or {})},
        "training": training or {"epochs": 3, "batchSize": 2},
        "output": {"uri": "file:///out/"},
    }


def refusal(spec: dict) -> str:
    with pytest.raises(ValidationError) as info:
        TrainParameters.model_validate(spec)
    return describe_validation_error(info.value)


def test_variant_check_suggests_close_names() -> None:
    check_variant(VARIANT)
    with pytest.raises(ValueError, match=r"did you mean .*mask_rcnn_R_50_FPN_3x\.yaml"):
        check_variant("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3X.yml")
    with pytest.raises(ValueError, match=r"'nothing-like-it' is not a Detectron2 model-zoo config; e\.g\. "):
        check_variant("nothing-like-it")


def test_overrides_are_flattened_and_coerced() -> None:
    given = {"SOLVER": {"BASE_LR": 1, "WEIGHT_DECAY": "1e-4"}, "SOLVER.IMS_PER_BATCH": 8, "INPUT.CROP.SIZE": (0.9, 0.9)}
    out = check_overrides(given)
    assert out == {
        "SOLVER.BASE_LR": 1.0,
        "SOLVER.WEIGHT_DECAY": 1e-4,
        "SOLVER.IMS_PER_BATCH": 8,
        "INPUT.CROP.SIZE": [0.9, 0.9],
    }
    assert type(out["SOLVER.BASE_LR"]) is float and type(out["SOLVER.IMS_PER_BATCH"]) is int
    assert check_overrides({}) == {}


def test_overrides_report_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as info:
        check_overrides({"SOLVER.BASE_LRR": 0.1, "SOLVER.IMS_PER_BATCH": True, "SOLVER.GAMMA": "half", "ZZZ": 1})
    msg = str(info.value)
    assert msg.startswith("model.overrides: ")
    assert "SOLVER.BASE_LRR is not a Detectron2 config key (did you mean SOLVER.BASE_LR?)" in msg
    assert "SOLVER.IMS_PER_BATCH: expected int, got bool True" in msg
    assert "SOLVER.GAMMA: expected float, got str 'half'" in msg
    assert "ZZZ is not a Detectron2 config key" in msg and "ZZZ is not a Detectron2 config key (" not in msg
    with pytest.raises(ValueError, match="expected int, got float 8.0"):
        check_overrides({"SOLVER": {"IMS_PER_BATCH": 8.0}})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (d2_params({"variant": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1X.yaml"}), "did you mean"),
        (d2_params({"overrides": {"SOLVER.BASE_LRR": 0.1}}), "did you mean SOLVER.BASE_LR?"),
        (d2_params(data={"format": "mask-folder"}), "data.format 'mask-folder' has no class labels"),
        (d2_params(epochs=1, gradAccumulation=2), "training.gradAccumulation is not supported for detectron2"),
        (d2_params(epochs=1, evalEvery=5, earlyStopping={"metric": "miou"}), "must be bbox_ap or segm_ap, got 'miou'"),
    ],
)
def test_detectron2_spec_refusals_name_the_field(spec: dict, expected: str) -> None:
    assert expected in refusal(spec)


def test_rules_for_other_families() -> None:
    sam2 = d2_params({"family": "sam2", "variant": "sam2.1_hiera_tiny"}, {"format": "coco"}, epochs=1)
    TrainParameters.model_validate(sam2)
    sam2["training"].update(evalEvery=5, earlyStopping={"metric": "bbox_ap"})
    assert "training.earlyStopping.metric 'bbox_ap' is for detectron2" in refusal(sam2)
    sam2["training"] = {"epochs": 1, "optimizer": {"lrScaling": "linear"}}
    assert "lrScaling linear needs training.optimizer.referenceBatch" in refusal(sam2)
    sam2["training"] = {"epochs": 1}
    sam2["model"]["overrides"] = {"SOLVER.BASE_LR": 0.1}
    assert "model.overrides applies to family detectron2 only" in refusal(sam2)
    # Detectron2 takes the reference batch from the zoo config.
    TrainParameters.model_validate(d2_params(epochs=1, optimizer={"lrScaling": "linear"}))


def test_scaled_lr() -> None:
    assert OptimizerSpec().scaled_lr(0.1, 64, 16) == 0.1
    linear = OptimizerSpec(lr_scaling="linear")
    assert linear.scaled_lr(0.1, 8, 16) == pytest.approx(0.05)
    assert linear.scaled_lr(0.1, 8) == pytest.approx(0.1)
    assert OptimizerSpec(lr_scaling="linear", reference_batch=4).scaled_lr(0.1, 8, 16) == pytest.approx(0.2)


def test_resolved_fills_only_nulls() -> None:
    spec = TrainParameters.model_validate(d2_params(epochs=1, evalEvery=2, earlyStopping={})).training
    done = spec.resolved(SAM2_DEFAULTS)
    assert (done.optimizer.name, done.optimizer.lr, done.optimizer.weight_decay) == ("adamw", 1e-5, 4e-5)
    assert (done.schedule.type, done.schedule.warmup_steps, done.grad_clip) == ("cosine", 0, 1.0)
    assert done.early_stopping.metric == "miou"
    spec = TrainParameters.model_validate(
        d2_params(epochs=1, gradClip=0, optimizer={"name": "sgd", "lr": 0.5}, schedule={"type": "constant"})
    ).training
    done = spec.resolved(SAM2_DEFAULTS)
    assert (done.optimizer.name, done.optimizer.lr, done.schedule.type) == ("sgd", 0.5, "constant")
    assert done.grad_clip is None  # 0 turns clipping off
    assert spec.optimizer.lr == 0.5 and spec.optimizer.weight_decay is None  # the original is untouched


def make_plan(spec: dict, facts: DatasetFacts = FACTS, world: int = 2, zoo: dict = ZOO):
    return plan(TrainParameters.model_validate(spec), zoo, facts, world, "file:///w.pkl")


def test_plan_keeps_zoo_values_for_unset_fields() -> None:
    p = make_plan(d2_params())
    assert (p.total_batch, p.max_iter, p.optimizer) == (4, 38, "sgd")  # ceil(3 * 50 / 4)
    s = p.settings
    assert s["MODEL.WEIGHTS"] == "file:///w.pkl"
    assert s["MODEL.ROI_HEADS.NUM_CLASSES"] == s["MODEL.RETINANET.NUM_CLASSES"] == 3
    # The zoo's lr was set for its 16 images a step; 4 here take a quarter of it.
    assert (s["SOLVER.IMS_PER_BATCH"], s["SOLVER.MAX_ITER"], s["SOLVER.BASE_LR"]) == (4, 38, 0.02 * 4 / 16)
    assert (s["SOLVER.WARMUP_ITERS"], s["SOLVER.STEPS"], s["SOLVER.CHECKPOINT_PERIOD"]) == (3, [], 38)
    assert (s["TEST.EVAL_PERIOD"], s["SOLVER.AMP.ENABLED"], s["SEED"]) == (0, False, 0)
    unset = {"SOLVER.WEIGHT_DECAY", "SOLVER.LR_SCHEDULER_NAME", "SOLVER.CLIP_GRADIENTS.ENABLED", "INPUT.MASK_FORMAT"}
    assert not unset & s.keys()
    assert p.merge_list()[:4] == ["MODEL.WEIGHTS", "file:///w.pkl", "MODEL.ROI_HEADS.NUM_CLASSES", 3]
    assert len(p.merge_list()) == 2 * len(s)


def test_plan_drops_only_unreached_zoo_steps() -> None:
    p = make_plan(d2_params(maxSteps=50), zoo={**ZOO, "SOLVER.STEPS": (10, 49, 50, 100)})
    assert p.max_iter == 50 and p.settings["SOLVER.STEPS"] == [10, 49]


def test_plan_maps_fields_that_are_set() -> None:
    opt = {"name": "adamw", "lr": 0.001, "weightDecay": 0.0005}
    sched = {"type": "cosine", "warmupSteps": 7, "minLrRatio": 0.1}
    spec = d2_params(maxSteps=100, batchSize=4, precision="fp16", gradClip=1.5, evalEvery=10, seed=5)
    spec["training"].update(optimizer=opt, schedule=sched)
    spec["output"]["checkpointEvery"] = 20
    p = make_plan(spec, DatasetFacts(50, 3, has_rle=True, has_validation=True))
    s = p.settings
    assert (p.optimizer, p.total_batch, p.max_iter) == ("adamw", 8, 100)
    assert (s["SOLVER.BASE_LR"], s["SOLVER.WEIGHT_DECAY"], s["SOLVER.WARMUP_ITERS"]) == (0.001, 0.0005, 7)
    assert (s["SOLVER.LR_SCHEDULER_NAME"], s["SOLVER.STEPS"]) == ("WarmupCosineLR", [])
    assert s["SOLVER.BASE_LR_END"] == pytest.approx(0.0001)
    assert (s["SOLVER.AMP.ENABLED"], s["SOLVER.CHECKPOINT_PERIOD"], s["SEED"]) == (True, 20, 5)
    assert s["TEST.EVAL_PERIOD"] == 10  # there is a validation split
    assert s["SOLVER.CLIP_GRADIENTS.ENABLED"] is True
    assert (s["SOLVER.CLIP_GRADIENTS.CLIP_TYPE"], s["SOLVER.CLIP_GRADIENTS.CLIP_VALUE"]) == ("full_model", 1.5)
    assert s["INPUT.MASK_FORMAT"] == "bitmask"


def test_plan_multistep_and_clipping_off() -> None:
    spec = d2_params(maxSteps=20, gradClip=0, evalEvery=5, schedule={"type": "multistep", "milestones": [5, 9]})
    s = make_plan(spec).settings  # no validation split: no periodic evaluation
    assert (s["SOLVER.LR_SCHEDULER_NAME"], s["SOLVER.STEPS"], s["SOLVER.GAMMA"]) == ("WarmupMultiStepLR", [5, 9], 0.1)
    assert s["SOLVER.CLIP_GRADIENTS.ENABLED"] is False and "SOLVER.CLIP_GRADIENTS.CLIP_TYPE" not in s
    assert s["TEST.EVAL_PERIOD"] == 0


def test_plan_linear_scaling_reference() -> None:
    zoo_ref = make_plan(d2_params(epochs=1, batchSize=2, optimizer={"lrScaling": "linear"}))
    assert zoo_ref.settings["SOLVER.BASE_LR"] == pytest.approx(0.02 * 4 / 16)
    kept = make_plan(d2_params(epochs=1, batchSize=2, optimizer={"lrScaling": "none"}))
    assert kept.settings["SOLVER.BASE_LR"] == 0.02  # the zoo's value as it is, when asked
    own = {"lrScaling": "linear", "lr": 0.01, "referenceBatch": 8}
    own_ref = make_plan(d2_params(epochs=1, batchSize=2, optimizer=own))
    assert own_ref.settings["SOLVER.BASE_LR"] == pytest.approx(0.01 * 4 / 8)


def test_plan_overrides_win_and_batch_must_divide() -> None:
    overrides = {"SOLVER": {"BASE_LR": 0.1, "MAX_ITER": 7, "IMS_PER_BATCH": 8}, "INPUT.MASK_FORMAT": "polygon"}
    spec = d2_params({"overrides": overrides}, optimizer={"lr": 0.001}, maxSteps=50)
    assert TrainParameters.model_validate(spec).model.overrides == overrides  # kept as written
    p = make_plan(spec, replace(FACTS, has_rle=True))
    assert (p.settings["SOLVER.BASE_LR"], p.max_iter, p.total_batch) == (0.1, 7, 8)
    assert p.settings["INPUT.MASK_FORMAT"] == "polygon"
    with pytest.raises(ConfigError, match="SOLVER.IMS_PER_BATCH=6 is not divisible by the 4 processes"):
        make_plan(d2_params({"overrides": {"SOLVER.IMS_PER_BATCH": 6}}), world=4)


def test_bridge_keeps_fresh_values_and_evaluations() -> None:
    fresh = {"total_loss": 1.5, "loss_cls": 0.4, "lr": 0.01, "time": 0.5, "data_time": 0.03, "rank_data_time": 0.02}
    kept = {"eval/segm_ap": 30.0, "best/segm_ap": 31.0, "checkpoint/last_step": 5.0}
    latest = {k: (v, 9) for k, v in fresh.items()} | {k: (v, 4) for k, v in kept.items()}
    latest["loss_mask"] = (0.3, 8)  # stale: written at the previous iteration
    snap = bridge(latest, 9, RunShape(total_batch=8, world_size=2, train_images=20, max_iter=100))
    assert snap.step == 10
    loop = {"step": 10, "total_steps": 100, "epoch": 4, "images_per_second": 16.0}
    assert snap.scalars == loop | {"loss": 1.5, "loss_cls": 0.4, "lr": 0.01} | kept
    assert snap.observations == {"step_seconds": [0.5], "data_wait_seconds": [0.02]}
    assert snap.increments == {"images": 4.0}
    later = bridge(latest, 10, RunShape(8, 2, 20, 100))
    assert "loss" not in later.scalars and not later.observations and later.scalars["eval/segm_ap"] == 30.0


@pytest.mark.parametrize("world", [1, 3])
def test_resumable_stream_resumes_and_shards(world: int) -> None:
    size = 10
    for rank in range(world):
        whole = list(islice(ResumableStream(size, rank, world, seed=7), 40))
        for start in (1, 3, 4, 9, 17):
            assert list(islice(ResumableStream(size, rank, world, seed=7, start=start), 40 - start)) == whole[start:]
    # Detectron2's TrainingSampler layout: global position k goes to rank k mod world, and every
    # `size` consecutive global positions are one permutation (ranks never drift apart).
    shares = [list(islice(ResumableStream(size, rank, world, seed=7), 40)) for rank in range(world)]
    stream = [shares[k % world][k // world] for k in range(40 * world)]
    for epoch in range(3):
        assert sorted(stream[epoch * size : (epoch + 1) * size]) == list(range(size))
    a = list(islice(ResumableStream(size, 0, 1, seed=7), 30))
    assert a != list(islice(ResumableStream(size, 0, 1, seed=8), 30))
    assert sorted(a[:10]) == sorted(a[10:20]) and a[:10] != a[10:20]  # a fresh permutation each epoch


def test_modules_work_without_detectron2() -> None:
    code = (
        "import sys; sys.modules['detectron2'] = None\n"  # `import detectron2` now raises ImportError
        "from kubetune_trainer import config\n"
        "from kubetune_trainer.config import detectron2_keys\n"
        "from kubetune_trainer.d2 import bridge, datasets, plan, sampler\n"
        "detectron2_keys.check_variant(sys.argv[1])\n"
        "assert detectron2_keys.check_overrides({'SOLVER.BASE_LR': 1}) == {'SOLVER.BASE_LR': 1.0}\n"
        "assert not [m for m in sys.modules if m.startswith('detectron2.')]\n"
    )
    done = subprocess.run([sys.executable, "-c", code, VARIANT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_overridden_batch_and_length_drive_the_derived_values() -> None:
    linear = {"epochs": 3, "batchSize": 2, "optimizer": {"lrScaling": "linear"}}
    s = make_plan(d2_params({"overrides": {"SOLVER.IMS_PER_BATCH": 8}}, **linear)).settings
    assert s["SOLVER.MAX_ITER"] == 19  # ceil(3 epochs × 50 images / 8), at the overridden batch
    assert s["SOLVER.BASE_LR"] == pytest.approx(0.02 * 8 / 16)
    capped = make_plan(d2_params({"overrides": {"SOLVER.MAX_ITER": 20}}, maxSteps=100), world=1)
    assert capped.max_iter == 20 and capped.settings["SOLVER.WARMUP_ITERS"] == 2
    assert capped.settings["SOLVER.CHECKPOINT_PERIOD"] == 20


def test_detectron2_example_is_a_valid_finetunejob() -> None:
    from kubetune_operator.specs import FineTuneJob

    example = ROOT / "examples" / "finetunejob-detectron2.yaml"
    job = FineTuneJob.model_validate(yaml.safe_load(example.read_text()))
    assert job.spec.model.family == "detectron2" and job.spec.training.precision == "fp16"


def test_coco_results_become_fractions_per_size_and_per_class() -> None:
    """COCOEvaluator's dict (percentages; NaN where no object of a size exists) under kubetune's names."""
    from kubetune_trainer.d2.bridge import coco_results

    nan = float("nan")
    results = {
        "bbox": {"AP": 40.0, "AP50": 60.0, "AP75": 41.0, "APs": nan, "APm": 30.0, "APl": 50.0, "AP-cat": 45.0},
        "segm": {"AP": 35.0, "AP50": 55.0, "AP75": 36.0, "APs": nan, "APm": 25.0, "APl": 45.0, "AP-cat": 38.0},
    }
    results["bbox"]["AP-traffic/light"] = 35.0
    out = coco_results(results, ("bbox", "segm"))
    assert out["bbox_ap"] == 0.4 and out["segm_ap50"] == 0.55 and out["size/medium/segm_ap"] == 0.25
    assert out["size/small/bbox_ap"] != out["size/small/bbox_ap"]  # NaN stays NaN (null in report.json)
    assert out["class/traffic_light/bbox_ap"] == 0.35  # a slash in a class name does not nest the key
    assert not any(k.startswith("class/") and k.endswith("segm_ap") for k in out)  # one class: no table
