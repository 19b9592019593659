"""Detectron2's config keys and model-zoo names as data, so a FineTuneJob's `model.overrides` and
`model.variant` are checked where detectron2 is not installed (the operator, `kubetune validate`).

`detectron2_config.json` is generated from detectron2 itself (`python -m kubetune_trainer.d2.schema`)
and a test compares it with the installed detectron2 wherever that is importable. The rules mirror
yacs' own merge check (same type; list and tuple interchange; None accepts anything), plus two
conversions YAML users need: an int where a float is expected, and "1e-4" (a string to PyYAML).
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).with_name("detectron2_config.json")
# Model-zoo families the trainer's data (boxes and instance masks) can train.
ARCHITECTURES = ("GeneralizedRCNN", "RetinaNet")
TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list", type(None): "none"}


@cache
def snapshot() -> dict[str, Any]:
    return json.loads(SNAPSHOT.read_text())


def zoo_configs() -> dict[str, dict[str, Any]]:
    """Model-zoo config name → {"masks": predicts instance masks}."""
    return snapshot()["model_zoo"]


def check_variant(name: str) -> None:
    zoo = zoo_configs()
    if name not in zoo:
        close = difflib.get_close_matches(name, list(zoo), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. {', '.join(list(zoo)[:3])}"
        raise ValueError(f"model.variant {name!r} is not a Detectron2 model-zoo config{hint}")


def flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"SOLVER": {"BASE_LR": 1}} and {"SOLVER.BASE_LR": 1} are the same override."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def check_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Flat, type-checked overrides ready for `CfgNode.merge_from_list`; every problem in one error."""
    keys: dict[str, str] = snapshot()["keys"]
    result, problems = {}, []
    for key, value in flatten(overrides).items():
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.75)
            problems.append(f"{key} is not a Detectron2 config key" + (f" (did you mean {close[0]}?)" if close else ""))
            continue
        try:
            result[key] = _coerce(value, keys[key])
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    if problems:
        raise ValueError("model.overrides: " + "; ".join(problems))
    return result


def _coerce(value: Any, expected: str) -> Any:
    got = TYPE_NAMES.get(type(value), type(value).__name__)
    if expected == "none" or got == expected or value is None:
        return list(value) if isinstance(value, tuple) else value
    if expected == "float" and got == "int":
        return float(value)
    if expected == "float" and got == "str":
        try:
            return float(value)
        except ValueError:
            pass
    raise ValueError(f"expected {expected}, got {got} {value!r}")
