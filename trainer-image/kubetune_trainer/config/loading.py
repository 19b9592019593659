"""Reading a spec or trainer config from a file, and saying in one line what is wrong with it."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kubetune_trainer.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def load_validated(path: Path, model: type[M]) -> M:
    """Read a YAML or JSON document (YAML is a superset of JSON) and validate it with `model`."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML or JSON: {exc}") from exc
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from exc


def describe_validation_error(exc: ValidationError) -> str:
    """'training.batchSize: Input should be greater than or equal to 1; ...' — one line."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        parts.append(f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(parts)
