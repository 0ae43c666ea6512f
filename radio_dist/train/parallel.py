"""Data parallelism, precision and the optimizer for every radio-dist training job, by PyTorch's own parts.

- ``data_parallel`` wraps a model for the job's workers in PyTorch's DDP: gradients are averaged in buckets
  while the backward pass still runs, and construction gives every worker rank 0's initial weights. The
  plain module stays the one that is checkpointed, exported and EMA-averaged; only the forward that is
  trained goes through the wrapper.
- ``autocast_dtype`` / ``autocast``: ``precision: auto`` is bf16 autocast on CUDA (fp32 master weights and
  optimizer state) and fp32 elsewhere; ``bf16`` and ``fp32`` force it.
- ``make_adamw``: fused AdamW on CUDA, the multi-tensor one elsewhere.
- ``mean_over_workers``: the step's metrics, sample-weighted over the workers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]


def data_parallel(model: torch.nn.Module, distributed: bool, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in DDP when the workers share a process group, else ``model`` itself.

    Buffers are synced once, at construction, not before every forward: the students' buffers are constants
    (pixel mean/std), and rank 0's are the ones exported.
    """
    if not distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.11 names it forward_sync_buffers (the buffers are still synced once, at construction)
    takes = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync: dict[str, Any] = (
        {"forward_sync_buffers": False} if "forward_sync_buffers" in takes else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model,
        device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None,
        gradient_as_bucket_view=True,
        **no_sync,
    )


def autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on ``device`` (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Mixed-precision forward on ``device`` (nothing when ``dtype`` is None)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def make_adamw(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on CUDA."""
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def sum_over_workers(values: list[float]) -> list[float]:
    """Element-wise sum over the workers (every worker gets the result)."""
    import torch.distributed as dist

    vec = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(vec)
    return [float(v) for v in vec.tolist()]


def mean_over_workers(metrics: dict[str, float], keys: list[str], n_local: int) -> dict[str, float]:
    """Sample-weighted mean of the step's ``keys`` over all workers (a worker with an empty batch adds 0);
    every worker gets the same dict (empty when no worker had samples)."""
    *sums, n = sum_over_workers([metrics.get(k, 0.0) * n_local for k in keys] + [float(n_local)])
    return {k: v / n for k, v in zip(keys, sums, strict=True)} if n else {}
