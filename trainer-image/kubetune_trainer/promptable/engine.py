"""The training loop and nothing else: batches in, one (mixed-precision) optimizer step out.

The loop knows no model family: `forward(model, batch)` runs under autocast and `loss(outputs,
batch)` turns the outputs into terms (`total` and named `parts`). The batch source owns its
position in the data. Evaluation, checkpoints and metric writing are hooks (before_train /
after_step / after_train) that may carry state of their own into checkpoints. AMP lives in
`run_step`: autocast for the forward, a GradScaler for fp16, skipped steps counted.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import torch
from torch import nn

from kubetune_trainer.config import TrainingSpec
from kubetune_trainer.errors import NonFiniteLoss
from kubetune_trainer.metrics.events import EventStorage
from kubetune_trainer.training import distributed
from kubetune_trainer.training.distributed import DistContext

log = structlog.get_logger(__name__)


class Terms(Protocol):
    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]  # running training metrics, recorded as they are named


class Batches(Protocol):
    """Batches without end, across epochs; where the next one comes from is checkpointed."""

    epoch: int

    def next(self) -> Any: ...
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, position: dict[str, int], same_world: bool) -> None: ...


class Hook:
    def before_train(self, trainer: Trainer) -> None: ...
    def after_step(self, trainer: Trainer) -> None: ...
    def after_train(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Top-level checkpoint entries this hook needs back on resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


NONFINITE_LIMIT = 20  # a loss spike is one NaN step; a divergence is a run of them


@dataclass
class TrainState:
    step: int = 0
    skipped_steps: int = 0  # optimizer steps dropped for non-finite gradients (AMP), whole run
    stopped_early: bool = False  # set by a hook; the loop ends after the current step


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        batches: Batches,
        spec: TrainingSpec,
        total_steps: int,
        ctx: DistContext,
        forward: Callable[[nn.Module, Any], Any],
        loss: Callable[[Any, Any], Terms],
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.batches = batches
        self.spec = spec
        self.total_steps = total_steps
        self.ctx = ctx
        self.forward = forward
        self.loss = loss
        self.scaler = distributed.grad_scaler(spec.precision, ctx.device)
        self.state = TrainState()
        self.storage = EventStorage()
        self.hooks: list[Hook] = []
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.nonfinite_run = 0  # steps in a row whose loss was NaN/inf

    @property
    def unwrapped(self) -> nn.Module:
        return self.model.module if hasattr(self.model, "module") else self.model

    def train(self) -> None:
        self.model.train()
        for hook in self.hooks:
            hook.before_train(self)
        while self.state.step < self.total_steps and not self.state.stopped_early:
            self.run_step()
            for hook in self.hooks:
                hook.after_step(self)
        for hook in self.hooks:
            hook.after_train(self)

    def run_step(self) -> None:
        start = time.perf_counter()
        waited = 0.0
        accum = self.spec.grad_accumulation
        loss_sum = torch.zeros((), device=self.ctx.device)
        parts: dict[str, torch.Tensor] = {}
        images = 0
        for micro in range(accum):
            tick = time.perf_counter()
            batch = self.batches.next().to(self.ctx.device)
            waited += time.perf_counter() - tick
            images += batch.num_images
            with distributed.maybe_no_sync(self.model, micro < accum - 1):
                with distributed.autocast(self.spec.precision, self.ctx.device):
                    outputs = self.forward(self.model, batch)
                terms = self.loss(outputs, batch)
                self.scaler.scale(terms.total / accum).backward()
            loss_sum += terms.total.detach() / accum
            for k, v in {**terms.parts, **terms.metrics}.items():
                parts[k] = parts.get(k, 0) + v.detach() / accum
        skipped = self._optimizer_step()
        self.scheduler.step()
        self.state.step += 1
        self._record(loss_sum, parts, images, skipped, time.perf_counter() - start, waited)

    def _optimizer_step(self) -> bool:
        """Unscale, clip, step. True when the step was skipped for non-finite gradients."""
        self.scaler.unscale_(self.optimizer)
        clip = self.spec.grad_clip if self.spec.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if self.scaler.is_enabled():
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale  # the scale only backs off on inf/NaN
        else:
            skipped = not torch.isfinite(norm).item()  # a CPU-GPU sync point, once per step
            if not skipped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return skipped

    def _check_finite(self, loss: float) -> None:
        """The mean loss is the same number on every rank, so every rank stops together."""
        self.nonfinite_run = 0 if math.isfinite(loss) else self.nonfinite_run + 1
        if self.nonfinite_run >= NONFINITE_LIMIT:
            raise NonFiniteLoss(
                f"the loss was NaN/inf for {self.nonfinite_run} steps in a row (up to step {self.state.step})"
            )

    def _record(
        self,
        loss: torch.Tensor,
        parts: dict[str, torch.Tensor],
        images: int,
        skipped: bool,
        seconds: float,
        waited: float,
    ) -> None:
        keys = sorted(parts)
        packed = torch.stack([loss, *(parts[k] for k in keys)]).float()
        distributed.all_reduce(packed)
        packed /= self.ctx.world_size
        values = packed.tolist()
        self._check_finite(values[0])
        s = self.storage
        s.step = self.state.step
        s.put(loss=values[0], **dict(zip(keys, values[1:], strict=True)))
        s.put(
            step=self.state.step,
            total_steps=self.total_steps,
            epoch=self.batches.epoch,
            lr=self.optimizer.param_groups[0]["lr"],
            images_per_second=images * self.ctx.world_size / seconds,
            data_wait_share=waited / seconds,
        )
        if self.scaler.is_enabled():
            s.put(**{"amp/grad_scale": self.scaler.get_scale()})
        s.put_prefixed("gpu_memory", distributed.gpu_memory(self.ctx.device))
        s.observe("step_seconds", seconds)
        s.observe("data_wait_seconds", waited)
        s.inc("images", images)
        if skipped:
            self.state.skipped_steps += 1
            s.inc("amp/skipped_steps")
            log.warning("skipped a step with non-finite gradients", step=self.state.step)

    # -- checkpoint state -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Trainable weights only: frozen ones come back from the base weights on resume."""
        trainable = {n for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in self.unwrapped.state_dict().items() if k in trainable}
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        state = {
            "model": weights,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": {"step": self.state.step, **self.batches.state_dict()},
            "amp": {"skipped_steps": self.state.skipped_steps},
            "rng": rng,
            "world_size": self.ctx.world_size,
        }
        for hook in self.hooks:
            state.update(hook.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        result = self.unwrapped.load_state_dict(state["model"], strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint holds weights this model lacks: {result.unexpected_keys[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        same_world = state.get("world_size", self.ctx.world_size) == self.ctx.world_size
        if not same_world:
            log.warning("world size changed since the checkpoint; restarting its epoch", was=state["world_size"])
        self.batches.load_state_dict(state["position"], same_world)
        self.state.step = state["position"]["step"]
        self.state.skipped_steps = state.get("amp", {}).get("skipped_steps", 0)
        self.storage.step = self.state.step
        for hook in self.hooks:
            hook.load_state_dict(state)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate((3, tuple(state["rng"]["python"]), None))
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.ctx.device)
