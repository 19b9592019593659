"""The FineTuneJob CustomResourceDefinition, generated from the pydantic models.

pydantic writes JSON Schema; Kubernetes wants a structural OpenAPI v3.0 schema. The conversion
inlines `$ref`s, drops titles, turns `X | None` into `nullable`, tuples into fixed-length arrays,
`gt` bounds into `exclusiveMinimum: true`, and lets only `dict[str, Any]` fields (detectron2
overrides) keep unknown fields. `crds/finetunejob.yaml` is this module's output; a test fails when
the committed file drifts.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetune_operator.specs import GROUP, KIND, PLURAL, VERSION, FineTuneJobSpec, FineTuneJobStatus

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.variant"},
    {
        "name": "Progress",
        "type": "number",
        "format": "float",
        "jsonPath": ".status.progress.percent",
        "description": "Percent of optimizer steps done",
    },
    {"name": "Loss", "type": "number", "format": "float", "jsonPath": ".status.progress.loss"},
    {
        "name": "Base",
        "type": "number",
        "format": "float",
        "jsonPath": ".status.baselineMetric.value",
        "description": "The base model's validation metric, before training",
        "priority": 1,
    },
    {
        "name": "Best",
        "type": "number",
        "format": "float",
        "jsonPath": ".status.bestMetric.value",
        "description": "Best validation value so far",
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[1]]
        node = {**target, **node}  # the field's own description/default win over the model's
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {options} structurally")
        node = {**_structural(options[0], defs), **node, "nullable": True}
    node.pop("title", None)
    if "prefixItems" in node:
        items = node.pop("prefixItems")
        node["items"] = _structural(items[0], defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if not isinstance(node.get("exclusiveMinimum", True), bool):
        node["minimum"] = node.pop("exclusiveMinimum")
        node["exclusiveMinimum"] = True
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]  # Kubernetes prunes unknown fields; `false` is not allowed beside properties
    if node.get("additionalProperties") is True or (
        node.get("type") == "object" and not node.get("properties") and "additionalProperties" not in node
    ):
        node.pop("additionalProperties", None)
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("default", 0) is None or isinstance(node.get("default"), dict):
        node.pop("default")  # pydantic fills these in; the API server need not
    if "properties" in node:
        node["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = _structural(node[key], defs)
    return node


# Bounds on what the spec leaves free (a URI, a path, a list of tolerations, node labels): the
# API server refuses more, naming the field, before anything of the operator's reads it.
STRING_MAX = 4096  # an S3 key is at most 1,024 bytes; a URI or path of 4 KiB is already absurd
LIST_MAX = 64
MAP_MAX = 64


def _bounded(node: Any) -> Any:
    """`node` with a maxLength on every free string, maxItems on every list and maxProperties on
    every map that the models do not bound more tightly."""
    if isinstance(node, list):
        return [_bounded(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: _bounded(v) if k in ("items", "additionalProperties") else v for k, v in node.items()}
    if "properties" in node:
        node["properties"] = {k: _bounded(v) for k, v in node["properties"].items()}
    kind = node.get("type")
    if kind == "string" and "enum" not in node:
        node.setdefault("maxLength", STRING_MAX)
    elif kind == "array":
        node.setdefault("maxItems", LIST_MAX)
    elif kind == "object" and "properties" not in node:
        node.setdefault("maxProperties", MAP_MAX)
    return node


def openapi_schema(model: type) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.pop("$defs", {})
    return _structural(schema, defs)


def build_crd() -> dict[str, Any]:
    spec = _bounded(openapi_schema(FineTuneJobSpec))
    spec["description"] = "What to fine-tune, on which data, how, and where the results go."
    status = openapi_schema(FineTuneJobStatus)
    status["description"] = "Observed state, written by the kubetune operator."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "kubetune"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ftj"],
                "categories": ["kubetune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A fine-tuning run of SAM2, SAM or Detectron2, run as torchrun pods.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `kubetune crd` from kubetune_operator.specs; do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)
