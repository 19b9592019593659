"""fp16 with a GradScaler on a real SAM2 tiny: an injected inf gradient is skipped and counted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from kubetune_trainer.metrics.prometheus import PrometheusWriter
from kubetune_trainer.promptable.engine import Trainer
from prometheus_client import generate_latest

from tests.helpers import make_trainer


@pytest.fixture
def trainer(tiny_coco: Path) -> Trainer:
    return make_trainer(tiny_coco, "fp16")


def skipped_count(writer: PrometheusWriter) -> float:
    for line in generate_latest(writer.registry).decode().splitlines():
        if line.startswith("kubetune_amp_skipped_steps_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("kubetune_amp_skipped_steps_total not exported")


def test_inf_gradient_is_skipped_and_counted(trainer: Trainer, tiny_coco: Path) -> None:
    writer = PrometheusWriter("amp-test", "test", 0, "sam2")
    probe = trainer.unwrapped.sam.sam_mask_decoder.iou_prediction_head.layers[0].weight
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if p.requires_grad}
    handle = probe.register_hook(lambda grad: torch.full_like(grad, math.inf))
    scale = trainer.scaler.get_scale()
    trainer.run_step()
    handle.remove()
    writer.write(trainer.storage.drain())
    assert skipped_count(writer) == 1.0
    assert trainer.scaler.get_scale() == scale / 2  # backed off
    for name, param in trainer.unwrapped.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, before[name]), f"{name} changed on a skipped step"
    trainer.run_step()  # a healthy step updates the weights and is not counted
    writer.write(trainer.storage.drain())
    assert skipped_count(writer) == 1.0
    assert not torch.equal(probe, before["sam.sam_mask_decoder.iou_prediction_head.layers.0.weight"])
    exposition = generate_latest(writer.registry).decode()
    assert 'kubetune_amp_grad_scale{family="sam2",job="amp-test",namespace="test",rank="0"} 32768.0' in exposition
    # The run's count (the report's amp_skipped_steps) survives a checkpoint and resume.
    assert trainer.state.skipped_steps == 1
    resumed = make_trainer(tiny_coco, "fp16")
    resumed.load_state_dict(trainer.state_dict())
    assert resumed.state.skipped_steps == 1


def test_gradient_accumulation_consumes_micro_batches(tiny_coco: Path) -> None:
    trainer = make_trainer(tiny_coco, "bf16", accumulation=2)
    trainer.run_step()
    snap = trainer.storage.drain()
    assert trainer.state.step == 1 and trainer.batches.taken == 2
    assert snap.increments["images"] == 4 and math.isfinite(snap.scalars["loss"])
    assert not trainer.scaler.is_enabled()  # bf16 needs no scaler
