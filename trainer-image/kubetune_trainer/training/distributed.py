"""Everything about processes and devices in one place: torchrun's environment, the process
group, device choice, autocast and the GradScaler. Model adapters never touch these."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from kubetune_trainer.config import environment
from kubetune_trainer.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRYABLE, ConfigError, DataError, KubetuneError

T = TypeVar("T")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_leader(self) -> bool:
        return self.local_rank == 0


def init(timeout_s: int | None = None) -> DistContext:
    """Read RANK/LOCAL_RANK/WORLD_SIZE (torchrun sets them) and join the process group.

    NCCL on GPUs, gloo on the CPU. A plain `python -m kubetune_trainer` is a world of one.
    Collectives time out after KUBETUNE_COLLECTIVE_TIMEOUT_S (the operator sets it below the
    job's progress deadline), so a hung peer ends the run instead of stalling it; staging, which
    may take far longer, waits outside any collective (`leader_first`).
    """
    if timeout_s is None:
        timeout_s = int(os.environ.get(environment.COLLECTIVE_TIMEOUT_S, environment.DEFAULT_COLLECTIVE_TIMEOUT_S))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None
        )
    return DistContext(rank, local_rank, world, local_world, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place reduction across ranks; a no-op in a world of one. NCCL reduces only CUDA
    tensors, so a CPU tensor (a flag, an exit code) goes through the device and back."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(moved, op=op)
            tensor.copy_(moved.cpu())
        else:
            dist.all_reduce(tensor, op=op)
    return tensor


def broadcast_object(obj: T, src: int = 0) -> T:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank; [obj] in a world of one."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def leader_first(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run `fn` on each node's local rank 0, then on the other ranks once it is done.

    The leader does the expensive part (downloads); followers then find everything cached.
    A leader's failure is shared with every rank, so no rank waits forever at a barrier, and
    bad-input errors keep their exit code everywhere.
    """
    result: T | None = None
    error: BaseException | None = None
    if ctx.is_local_leader:
        try:
            result = fn()
        except BaseException as exc:  # re-raised below, after telling the other ranks
            error = exc
    code = EXIT_OK if error is None else getattr(error, "exit_code", EXIT_RETRYABLE)
    flag = _leaders_done(ctx, code)
    if error is not None:
        raise error
    if flag == EXIT_BAD_INPUT:
        raise DataError("another node's local rank 0 could not stage inputs (its log has the reason)")
    if flag:
        raise KubetuneError("another node's local rank 0 failed while staging inputs")
    return fn() if not ctx.is_local_leader else result  # type: ignore[return-value]


_leader_calls = itertools.count()


def _leaders_done(ctx: DistContext, code: int) -> int:
    """Wait for every node's leader and return the worst exit code among them. Through torchrun's
    key-value store, not a collective: a download of hours must not run into the collective
    timeout, which is kept short so that a hung peer ends the run."""
    if ctx.world_size == 1 or not dist.is_initialized():
        return code
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(days=1)
    )
    call, nodes = next(_leader_calls), ctx.world_size // ctx.local_world_size
    keys = [f"kubetune/leader-first/{call}/{node}" for node in range(nodes)]
    if ctx.is_local_leader:
        store.set(keys[ctx.rank // ctx.local_world_size], str(code))
    store.wait(keys, timedelta(days=1))
    return max(int(store.get(key)) for key in keys)


def wrap_ddp(module: torch.nn.Module, ctx: DistContext, static_graph: bool = False) -> torch.nn.Module:
    """The module under DistributedDataParallel in a world of several (itself otherwise).

    Gradients live in the all-reduce buckets (no copy); `static_graph` (one micro-batch per step,
    the same parameters used every step) lets DDP skip its search for unused parameters."""
    if ctx.world_size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        module,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
        static_graph=static_graph,
    )


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A real scaler for fp16; a disabled one (a pass-through) for bf16/fp32."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("training.precision bf16 needs an Ampere or newer GPU; use fp16 here")


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, skip_sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on accumulation micro-batches but the last."""
    if skip_sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def gpu_memory(device: torch.device) -> dict[str, int]:
    """Allocated and reserved now, and the peak allocation since the process started (the
    headroom a larger batch would need)."""
    if device.type != "cuda":
        return {}
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak": torch.cuda.max_memory_allocated(device),
    }
