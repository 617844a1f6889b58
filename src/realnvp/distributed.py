"""Training on several processes with ``torch.distributed`` (one process per device).

``torchrun`` starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; :func:`setup` turns those into a process group (NCCL on CUDA devices, gloo on CPUs)
and picks the device ``cuda:LOCAL_RANK``. Without WORLD_SIZE > 1 nothing here runs and training
is the single-process code path, unchanged. See docs/distributed.md for the commands.

Synchronised batch norm. Batch statistics in train mode are per-process by default, so 2
processes × batch 32 would normalise with the statistics of 32 images, not of the global 64: a
different function of the data from 1 process × batch 64. With synchronisation, every batch-norm
layer (the flow's :class:`~realnvp.BatchNormFlow` and the s/t networks'
:class:`~realnvp.networks.BatchNorm2d`) combines each process's (count, mean, sum of squared
deviations) into the statistics of the global batch, through an all-reduce that autograd
differentiates, so the gradients are those of the global batch too. ``torch.nn.SyncBatchNorm``
would do this for the s/t networks on GPUs only; this one path runs on CPUs (gloo) and GPUs.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    #: a gloo group for small host-side agreements (None: the default group is gloo already)
    host_group: Any = field(default=None, compare=False, repr=False)

    @property
    def enabled(self) -> bool:
        """More than one process: collectives are needed."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the only process that writes files and prints."""
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    """"auto" (a GPU if there is one, else the CPU) or a device name that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:K") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine (this PyTorch) has no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) here")
    return device


def setup(device: str = "auto") -> DistributedContext:
    """The process group of this run, created from torchrun's environment if WORLD_SIZE > 1.

    An existing default process group (one made by the caller) is used as it is. With a CUDA
    ``device`` ("auto" on a GPU machine, "cuda" or "cuda:K") every process takes the GPU
    ``cuda:LOCAL_RANK`` and the backend is NCCL; otherwise the processes run on CPUs with gloo.
    """
    base = pick_device(device)
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistributedContext(0, 1, 0, base)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        base = torch.device("cuda", local_rank)
        torch.cuda.set_device(base)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo")
    # NCCL reduces device tensors only: reading one back would wait for the GPU's queue
    host_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, base,
                              host_group)


def shutdown() -> None:
    """Destroy the default process group, if there is one (at the end of a run)."""
    if dist.is_initialized():
        # broadcast_object's and gather_objects' tensors stay inside PyTorch, so no one can
        # wait for them (wait_until_released): a pause with the GIL free lets gloo's threads
        # let go of them before the interpreter exits (they are the last collectives before
        # an error at start)
        time.sleep(0.1)
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    if ctx.enabled:
        dist.barrier()


def max_over_processes(ctx: DistributedContext, value: int) -> int:
    """The largest of the processes' ``value``: one integer all-reduced on the host (gloo), so
    it never waits for a GPU."""
    return max_each_over_processes(ctx, [value])[0]


def max_each_over_processes(ctx: DistributedContext, values: Sequence[int]) -> list[int]:
    """The largest of the processes' ``values[i]``, for each i: one all-reduce on the host."""
    if not ctx.enabled:
        return list(values)
    flags = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=ctx.host_group)
    wait_until_released(flags)  # these polls are often a process's last collective
    return flags.tolist()


def wait_until_released(tensor: Tensor, timeout_s: float = 1.0) -> None:
    """Wait until nothing but Python holds ``tensor`` (at most ``timeout_s``).

    gloo's worker thread drops its reference to a collective's tensors just after it has woken
    the caller (in about 15 % of small all-reduces here, still held when the call returns). If
    Python frees the tensor first, that thread must take the GIL to free the tensor's Python
    object; if the process is exiting by then, a thread taking the GIL is ended and the process
    aborts (SIGABRT, "terminate called without an active exception"), although the run itself
    ended cleanly. Waiting here makes Python the last owner."""
    use_count = getattr(tensor, "_use_count", None)  # private: absent in some versions
    deadline = time.monotonic() + timeout_s
    while use_count is not None and use_count() > 1 and time.monotonic() < deadline:
        time.sleep(0)  # let the worker thread run


def agreed_signal(ctx: DistributedContext, signum: int | None) -> int | None:
    """The signal any process was asked to stop by (the largest number where several were:
    SIGTERM before SIGINT), or None: every process then stops after the same step."""
    return max_over_processes(ctx, signum or 0) or None


def broadcast_object(ctx: DistributedContext, obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(ctx: DistributedContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    boxes: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(boxes, obj)
    return boxes


# -- synchronised batch statistics ----------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the incoming gradients: each rank's
    contribution affects every rank's loss. (torch.distributed.nn.functional.all_reduce does the
    same but is deprecated in recent torch.)"""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _AllReduceSum.apply(grad)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Autograd-aware all-reduce (sum) over the default process group."""
    return _AllReduceSum.apply(tensor)


def batch_moments(x: Tensor, dims: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased variance, count) of ``x`` over ``dims``, per remaining (channel) index,
    over the union of every rank's ``x``: each rank contributes its count, mean
    and sum of squared deviations M2, and they are combined as in Chan et al.'s parallel
    variance, M2 = Σ_r M2_r + Σ_r n_r (mean_r − mean)², which stays exact where the sum of
    squares minus the squared sum would cancel. The per-rank rows are gathered with an all-reduce
    of a (world, 2C + 1) table (each rank fills its own row) because an all-reduce has the
    simplest autograd rule on every backend; gradients reach every rank's inputs.
    """
    var, mean = torch.var_mean(x, dim=list(dims), unbiased=False)
    count = x.new_tensor(float(x.numel() // max(mean.numel(), 1)))
    world, rank = dist.get_world_size(), dist.get_rank()
    row = torch.cat([count.view(1), mean.flatten(), var.flatten() * count])
    table = all_reduce_sum(F.pad(row.view(1, -1), (0, 0, rank, world - rank - 1)))
    c = mean.numel()
    counts, means, m2 = table[:, :1], table[:, 1:c + 1], table[:, c + 1:]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    global_var = (m2 + counts * (means - global_mean).square()).sum(0) / total
    return global_mean.view_as(mean), global_var.view_as(var), total


def batch_mean_var(x: Tensor, dims: Sequence[int], sync: bool = False) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of a batch, over all ranks with ``sync``. Without it,
    exactly ``torch.var_mean(x, dims, unbiased=False)`` (the single-process arithmetic)."""
    if not sync:
        var, mean = torch.var_mean(x, dim=list(dims), unbiased=False)
        return mean, var
    mean, var, _ = batch_moments(x, dims)
    return mean, var


def sync_batch_norm(module: nn.Module, enabled: bool = True) -> int:
    """Make every batch-norm layer of ``module`` that supports it (those with a ``sync_stats``
    switch) compute its training statistics over all ranks; returns how many it switched."""
    layers = [m for m in module.modules() if hasattr(m, "sync_stats")]
    for m in layers:
        m.sync_stats = enabled
    return len(layers)


def batchnorm_buffers(module: nn.Module) -> list[Tensor]:
    """Every batch-norm layer's state: running averages and ``num_batches_tracked`` counters."""
    return [b for name, b in module.named_buffers()
            if name.rsplit(".", 1)[-1].startswith(("running_", "num_batches_tracked"))]


def running_stat_buffers(module: nn.Module) -> list[Tensor]:
    """The floating-point running averages of every batch-norm layer."""
    return [b for b in batchnorm_buffers(module) if b.is_floating_point()]


@torch.no_grad()
def average_running_stats(ctx: DistributedContext, module: nn.Module) -> None:
    """Replace each rank's running batch-norm averages by their mean over ranks, so that all
    ranks hold (and rank 0 saves) the same statistics. Only needed without synchronisation."""
    if not ctx.enabled:
        return
    for b in running_stat_buffers(module):
        dist.all_reduce(b)
        b.div_(ctx.world_size)


# -- data and evaluation --------------------------------------------------------------------


def stream_seed(seed: int, rank: int, step: int, stream: str) -> int:
    """A 63-bit seed for random stream ``stream`` of rank ``rank`` at training step ``step``:
    a hash, so that no two (seed, rank, step, stream) share a seed."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Shard:
    """The images ``indices`` of a dataset, seen as a dataset (for :func:`realnvp.evaluate`)."""

    def __init__(self, dataset: Any, indices: Tensor) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, index: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.dataset.get_batch(self.indices[index])

    def __getattr__(self, name: str) -> Any:  # image_shape, eval_transform, ...
        return getattr(self.dataset, name)


def eval_shard(ctx: DistributedContext, n: int) -> Tensor:
    """The indices among the first ``n`` that this rank evaluates: ``rank, rank + W, ...``."""
    return torch.arange(ctx.rank, n, ctx.world_size)


def gather_shards(ctx: DistributedContext, values: Tensor, n: int) -> Tensor:
    """Every rank's per-image values (rank r holding images r, r + W, ...) → all n of them, in
    image order, on every rank."""
    if not ctx.enabled:
        return values
    longest = -(-n // ctx.world_size)
    padded = torch.zeros(longest, dtype=torch.float64, device=ctx.device)
    padded[:values.numel()] = values.to(ctx.device, torch.float64)
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    table = torch.stack(parts, dim=1).flatten()  # image i is at position i
    return table[:n].cpu()
