"""Detectron2 weights files read without running code from them.

The model zoo's `.pkl` files are pickles of plain dicts of numpy arrays. Detectron2's own
checkpointer reads them with `pickle.load`, which runs whatever a crafted file names. Here a
restricted unpickler admits only the few callables those files need to rebuild numpy arrays and
dicts, and refuses every other global, so a planted `__reduce__` never runs. `.pth` and other
torch files go through `torch.load(weights_only=True)`. detectron2-free, so it is tested
everywhere.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.errors import ConfigError

# What the zoo's pickles (protocol 2 and later, written by Python 2 and 3) reference.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
    ("numpy._core.numeric", "_frombuffer"),
}


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")
        return super().find_class(module, name)


def load_pickle(path: Path) -> Any:
    """A zoo-style `.pkl`; ConfigError (exit 2) naming the file for anything else."""
    try:
        with path.open("rb") as fh:
            return _Restricted(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"model.checkpoint {path.name} is not a plain weights pickle (arrays and dicts only): {exc}"
        ) from exc


def zoo_checkpoint(data: Any, path: Path) -> dict[str, Any]:
    """Detectron2's reading of a `.pkl` (its `DetectionCheckpointer._load_file`): its own zoo
    format as is; a Caffe2/Detectron1 file's blobs, without momenta, matched by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"model.checkpoint {path.name} does not hold a dict of weights")
    if "model" in data and "__author__" in data:
        return data
    blobs = data.get("blobs", data)
    weights = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
    return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}


def load_torch(path: Path) -> dict[str, Any]:
    """A `.pth` (or any torch file) with `weights_only=True`: tensors and containers only."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors alike: the file is not plain weights
        raise ConfigError(f"model.checkpoint {path.name} is not a plain torch weights file: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"model.checkpoint {path.name} does not hold a dict of weights")
    return loaded if "model" in loaded else {"model": loaded}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """What Detectron2's checkpointer would read from `path`, read safely."""
    if path.suffix == ".pkl":
        return zoo_checkpoint(load_pickle(path), path)
    loaded = load_torch(path)
    if path.suffix == ".pyth":  # pycls weights, as Detectron2 reads them
        state = loaded["model"].get("model_state", loaded["model"])
        weights = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        return {"model": weights, "__author__": "pycls", "matching_heuristics": True}
    return loaded
