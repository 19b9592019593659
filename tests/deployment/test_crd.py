"""The generated CRD: committed file in sync, valid for Kubernetes, and agreeing with pydantic."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft4Validator
from kubetune_operator.manifests.crd import build_crd, crd_yaml
from kubetune_operator.specs import FineTuneJob
from kubetune_trainer.config import describe_validation_error
from pydantic import ValidationError

from tests.helpers import ROOT

CRD_FILE = ROOT / "crds" / "finetunejob.yaml"


def example() -> dict:
    return yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())


def _draft4(node: Any) -> Any:
    """OpenAPI v3.0 `nullable` as JSON Schema draft 4 (which shares exclusiveMinimum's boolean form)."""
    if isinstance(node, list):
        return [_draft4(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _draft4(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


SCHEMA = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
VALIDATOR = Draft4Validator(_draft4(SCHEMA))


def _unknown_fields(obj: Any, schema: dict, path: str) -> list[str]:
    """What the API server's strict field validation reports as unknown (pruning would drop)."""
    if not isinstance(obj, dict) or schema.get("x-kubernetes-preserve-unknown-fields") or "properties" not in schema:
        if isinstance(obj, list) and "items" in schema:
            return [e for item in obj for e in _unknown_fields(item, schema["items"], path)]
        return []
    found = []
    for key, value in obj.items():
        if key not in schema["properties"]:
            found.append(f"{path}.{key}")
        else:
            found += _unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    return found


def crd_errors(obj: dict) -> list[str]:
    errors = [".".join(str(p) for p in e.absolute_path) + ": " + e.message for e in VALIDATOR.iter_errors(obj)]
    return errors + [f"{u[1:]}: unknown field" for u in _unknown_fields(obj, SCHEMA, "")]


def test_committed_crd_matches_the_models() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), (
        "crds/finetunejob.yaml drifted: run `kubetune crd > crds/finetunejob.yaml`"
    )


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(build_crd(), "1.33", strict=True)
    crd = build_crd()["spec"]
    assert crd["names"]["shortNames"] == ["ftj"] and crd["names"]["categories"] == ["kubetune"]
    version = crd["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == ["Phase", "Model", "Progress", "Loss", "Age"]
    assert [c["name"] for c in columns if c.get("priority") == 1] == ["Base", "Best"]  # kubectl get ftj -o wide


def test_only_detectron2_overrides_keep_unknown_fields() -> None:
    text = CRD_FILE.read_text()
    assert text.count("x-kubernetes-preserve-unknown-fields") == 1
    overrides = SCHEMA["properties"]["spec"]["properties"]["model"]["properties"]["overrides"]
    assert overrides["x-kubernetes-preserve-unknown-fields"] is True


def test_every_field_is_described() -> None:
    def walk(node: dict, path: str) -> list[str]:
        missing = [] if "description" in node or path.count(".") < 1 else [path]
        for key, child in node.get("properties", {}).items():
            missing += walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            missing += [m for m in walk(node["items"], path + "[]") if not m.endswith("[]")]
        return missing

    assert walk(SCHEMA["properties"]["spec"], "spec") == []
    assert walk(SCHEMA["properties"]["status"], "status") == []


def test_canonical_example_is_valid_for_both() -> None:
    assert crd_errors(example()) == []
    FineTuneJob.model_validate(example())


INVALID = [
    (("training", "precision"), "fp8", "spec.training.precision"),
    (("training", "batchSize"), 0, "spec.training.batchSize"),
    (("model", "family"), "yolo", "spec.model.family"),
    (("data", "format"), "yolo", "spec.data.format"),
    (("resources", "nodes"), 0, "spec.resources.nodes"),
    (("output", "keepLast"), "three", "spec.output.keepLast"),
    (("optimizer",), {"lr": 0.1}, "spec.optimizer"),  # belongs under training
    (("model", "trainable"), ["decoder"], "spec.model.trainable"),
    (("training", "optimizer", "lr"), 0, "spec.training.optimizer.lr"),
]


@pytest.mark.parametrize(("path", "value", "field"), INVALID, ids=[i[2] for i in INVALID])
def test_invalid_specs_are_rejected_by_both_naming_the_field(path, value, field) -> None:
    raw = copy.deepcopy(example())
    target = raw["spec"]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    schema_errors = crd_errors(raw)
    assert any(e.startswith(field) for e in schema_errors), schema_errors
    with pytest.raises(ValidationError) as info:
        FineTuneJob.model_validate(raw)
    assert field in describe_validation_error(info.value)


def test_missing_required_fields() -> None:
    raw = copy.deepcopy(example())
    del raw["spec"]["model"]["variant"]
    assert any("'variant' is a required property" in e for e in crd_errors(raw))
    with pytest.raises(ValidationError, match="spec.model.variant"):
        FineTuneJob.model_validate(raw)
