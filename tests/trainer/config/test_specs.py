"""The config/spec models: the canonical example parses, bad specs fail naming the field."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from kubetune_operator.specs import FineTuneJob
from kubetune_trainer.config import TrainConfig, describe_validation_error
from pydantic import ValidationError

from tests.helpers import ROOT

EXAMPLE = ROOT / "examples" / "finetunejob.yaml"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_canonical_example_parses_with_every_value() -> None:
    job = FineTuneJob.model_validate(example())
    spec = job.spec
    assert spec.model.variant == "sam2.1_hiera_small"
    assert spec.model.trainable == ["mask_decoder", "prompt_encoder"]
    assert spec.data.prompts.positive_points == 3
    assert spec.training.max_steps == 2000 and spec.training.epochs is None
    assert spec.training.optimizer.lr == 1.0e-5 and spec.training.optimizer.weight_decay == 4.0e-5
    assert spec.training.early_stopping.metric == "miou"
    assert spec.resources.gpus_per_node == 8 and spec.resources.shm_size == "16Gi"
    assert spec.output.keep_last == 3 and spec.run_policy.ttl_seconds_after_finished == 86400


def test_example_file_is_the_architecture_documents_example() -> None:
    block = re.search(r"## The canonical example.*?```yaml\n(.*?)```", ARCHITECTURE.read_text(), re.S).group(1)
    assert yaml.safe_load(block) == example()


def test_train_config_round_trips_through_json() -> None:
    config = FineTuneJob.model_validate(example()).train_config()
    assert config.job.name == "labpics-sam2" and config.job.namespace == "default"
    again = TrainConfig.model_validate_json(config.model_dump_json(by_alias=True))
    assert again == config
    assert "resources" not in config.model_dump(by_alias=True)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("spec", "training", "learningRate"), 1, "spec.training.learningRate"),
        (("spec", "model", "colour"), "red", "spec.model.colour"),
        (("spec", "bogus"), {}, "spec.bogus"),
    ],
)
def test_unknown_fields_are_rejected_by_name(path, value, field) -> None:
    raw = example()
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValidationError) as info:
        FineTuneJob.model_validate(raw)
    message = describe_validation_error(info.value)
    assert field in message and "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s: s["model"].update(variant="sam2.1_hiera_huge"), "not a SAM2 variant"),
        (lambda s: s["model"].update(imageSize=1000), "multiple of 32"),
        (
            lambda s: s["model"].update(checkpoint="ftp://x/y.pt"),
            "model.checkpoint must start with s3://, file://, hf://",
        ),
        (lambda s: s["model"].update(checkpointSha256="ABC"), "String should match pattern"),
        (lambda s: s["storage"].update(mirror="https://m/"), "storage.mirror must start with s3:// or file://"),
        (lambda s: s["output"].update(uri=s["data"]["source"] + "runs/"), "overlap: write outputs where the dataset"),
        (
            lambda s: s["data"].update(source=s["output"]["uri"] + "data"),
            "and data.source 's3://runs/labpics-sam2/data' overlap",
        ),
        (lambda s: s["data"].update(format="yolo"), "spec.data.format"),
        (lambda s: s["training"].update(epochs=3), "exactly one of epochs or maxSteps"),
        (lambda s: s["training"].update(batchSize=0), "spec.training.batchSize"),
        (lambda s: s["training"].update(precision="fp8"), "spec.training.precision"),
        (lambda s: s["training"].pop("evalEvery"), "earlyStopping needs training.evalEvery"),
        (lambda s: s["output"].update(uri="/tmp/out"), "output.uri must start with"),
        (lambda s: s["model"].update(overrides={"SOLVER.BASE_LR": 0.1}), "detectron2 only"),
        (lambda s: s["data"]["prompts"].update(type="points", positivePoints=0), "needs positivePoints"),
        (lambda s: s["data"].update(train="../../etc/annotations.json"), "data.train must be a path inside"),
        (lambda s: s["data"].update(validation="/etc/passwd"), "data.validation must be a path inside"),
    ],
)
def test_invalid_specs_fail_with_a_specific_message(mutate, expected) -> None:
    raw = copy.deepcopy(example())
    mutate(raw["spec"])
    with pytest.raises(ValidationError) as info:
        FineTuneJob.model_validate(raw)
    assert expected in describe_validation_error(info.value)


def test_config_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, kubetune_operator.specs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", ["../other", "a/b", "UPPER", "-x"])
def test_a_job_identity_is_a_kubernetes_name_it_names_a_cache_folder(name: str) -> None:
    raw = FineTuneJob.model_validate(example()).train_config().model_dump(by_alias=True)
    raw["job"]["name"] = name
    with pytest.raises(ValidationError, match="job.name"):
        TrainConfig.model_validate(raw)
