"""Weights files are untrusted: a pickle that would run code is refused (exit 2) in every format
the trainer reads, and the model zoo's own formats still load."""

from __future__ import annotations

import importlib.util
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from kubetune_trainer.d2.weights import read_checkpoint
from kubetune_trainer.errors import ConfigError


class Payload:
    """What a crafted weights file carries: unpickling it runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 5])
def test_model_zoo_pickles_load(tmp_path: Path, protocol: int) -> None:
    """Detectron2's zoo format (a dict of numpy arrays) and Caffe2's blobs, as Detectron2 reads them."""
    weights = OrderedDict(
        [("backbone.stem.conv1.weight", np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)), ("step", np.int64(3))]
    )
    zoo = tmp_path / "model_final_abc.pkl"
    zoo.write_bytes(pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo"}, protocol=protocol))
    loaded = read_checkpoint(zoo)
    assert loaded["__author__"] == "Detectron2 Model Zoo"
    assert np.array_equal(loaded["model"]["backbone.stem.conv1.weight"], weights["backbone.stem.conv1.weight"])
    caffe2 = tmp_path / "R-50.pkl"
    caffe2.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.ones(3), "conv1_w_momentum": np.ones(3)}}, protocol))
    caffe = read_checkpoint(caffe2)
    assert list(caffe["model"]) == ["conv1_w"] and caffe["__author__"] == "Caffe2" and caffe["matching_heuristics"]


@pytest.mark.parametrize("suffix", [".pkl", ".pth", ".pt"])
def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "owned"
    path = tmp_path / f"model{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps({"model": {"w": Payload(marker)}, "__author__": "x"}, protocol=2))
    else:
        torch.save({"model": {"w": Payload(marker)}}, path)
    with pytest.raises(ConfigError, match=f"model{suffix}") as err:
        read_checkpoint(path)
    assert err.value.exit_code == 2 and not marker.exists()


def test_torch_weights_load_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 7}, path)
    loaded = read_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.ones(2)) and loaded["iteration"] == 7


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is None, reason="detectron2 is not installed")
def test_detectron2_loads_zoo_weights_through_the_safe_reader(tmp_path: Path) -> None:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from kubetune_trainer.d2.build import load_base_weights

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    key = "roi_heads.box_predictor.cls_score.bias"
    target = np.full(model.state_dict()[key].shape, 0.25, np.float32)
    path = tmp_path / "model_final_abc.pkl"
    path.write_bytes(pickle.dumps({"model": {key: target}, "__author__": "Detectron2 Model Zoo"}, protocol=2))
    load_base_weights(model, path)
    assert torch.equal(model.state_dict()[key], torch.from_numpy(target))
    marker = tmp_path / "owned"
    path.write_bytes(pickle.dumps({"model": {key: Payload(marker)}, "__author__": "x"}, protocol=2))
    with pytest.raises(ConfigError):
        load_base_weights(model, path)
    assert not marker.exists()
