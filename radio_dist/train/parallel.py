"""Data parallelism, precision and the optimizer for every radio-dist training job, by PyTorch's own parts.

- ``data_parallel`` wraps a model for the job's workers in PyTorch's DDP: gradients are averaged in buckets
  while the backward pass still runs, and construction gives every worker rank 0's initial weights. The
  plain module stays the one that is checkpointed, exported and EMA-averaged; only the forward that is
  trained goes through the wrapper.
- ``fully_sharded`` shards a large student with FSDP2 instead (``students[].parallel: fsdp``): each block
  (a ViT's blocks, a ConvNeXt's stages), then the root, ``fully_shard``-ed over the workers with a
  mixed-precision policy (parameters gathered in the compute dtype, gradients reduced in fp32); its
  checkpoints and exports gather the full state (``full_state`` / ``load_full_state``).
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


def broadcast_module(model: torch.nn.Module) -> None:
    """Every worker takes rank 0's parameters and buffers (before FSDP2 shards them)."""
    import torch.distributed as dist

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one at a time: the first ``blocks`` (ViTs) or ``stages`` (ConvNeXt)
    container found in the model."""
    for name in ("blocks", "stages"):
        for path, module in model.named_modules():
            if path.rsplit(".", 1)[-1] == name and isinstance(
                module, torch.nn.ModuleList | torch.nn.Sequential
            ):
                return list(module)
    return []


def fully_sharded(
    model: torch.nn.Module, dtype: torch.dtype | None, reshard_root: bool = False
) -> torch.nn.Module:
    """FSDP2 over the default process group: every block, then the root; parameters are all-gathered in
    ``dtype`` for compute (None: fp32) and gradients reduce-scattered in fp32. Sharded in place.
    ``reshard_root``: the root's own parameters are sharded again after the forward too (a model that only
    runs forwards, like the EMA, has no backward to do it)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=True if reshard_root else None)
    return model


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The full (unsharded) model and optimizer state of an FSDP2 module, on the CPU of rank 0 (the other
    ranks get empty dicts; every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    opt_state = get_optimizer_state_dict(model, opt, options=options) if opt is not None else None
    return model_state, opt_state


def load_full_state(
    model: torch.nn.Module,
    state: dict,
    opt: torch.optim.Optimizer | None = None,
    opt_state: dict | None = None,
) -> None:
    """Load a full state (every rank holds it) into an FSDP2 module and its optimizer, each rank its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state, options=options)
    if opt is not None and opt_state is not None:
        set_optimizer_state_dict(model, opt, opt_state, options=options)


def named_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A plain module's optimizer state keyed by parameter names (``torch.optim``'s own is keyed by position),
    the form ``load_full_state`` loads into a sharded module: a job relaunched on more workers shards it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt)


def load_named_optimizer_state(
    model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load ``named_optimizer_state``'s form into a plain module's optimizer (or, from checkpoints written
    before it, ``torch.optim``'s positional form)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    groups = state.get("param_groups") or [{}]
    if any(isinstance(p, int) for p in groups[0].get("params", [])):
        opt.load_state_dict(state)
        return
    set_optimizer_state_dict(model, opt, state)


# Dense bf16 tensor-core rates of the datasheets (TFLOP/s), by device name: the MFU denominator.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_tflops(device: torch.device) -> float | None:
    """The datasheet bf16 rate of a CUDA device (None elsewhere or for an unknown one)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


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
