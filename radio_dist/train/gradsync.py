"""Collectives between Ray Train workers: gradient averaging by hand, parameter broadcast, metric means.

Each student is a plain module on every worker; after its backward pass ``all_reduce_grads`` sums its
gradients over the workers (one flat all-reduce; the loss is pre-scaled by the worker's share of the
global batch, so the sum is the global mean), and ``broadcast_params`` gives every worker rank 0's initial
weights. Callers use them only when the workers share a process group (``WorkerContext.distributed``).
"""

from __future__ import annotations

import torch


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum every parameter's gradient over the workers, in place (one flat all-reduce)."""
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i : i + n].view_as(g))
        i += n


def broadcast_params(model: torch.nn.Module) -> None:
    """Every worker takes rank 0's parameters and buffers."""
    import torch.distributed as dist

    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def mean_over_workers(metrics: dict[str, float], keys: list[str], n_local: int) -> dict[str, float]:
    """Sample-weighted mean of the step's ``keys`` over all workers (a worker with an empty batch adds 0);
    every worker gets the same dict (empty when no worker had samples)."""
    import torch.distributed as dist

    vec = torch.tensor([metrics.get(k, 0.0) * n_local for k in keys] + [float(n_local)], dtype=torch.float64)
    dist.all_reduce(vec)
    n = vec[-1].item()
    return {k: float(v / n) for k, v in zip(keys, vec[:-1].tolist(), strict=True)} if n else {}
