"""Helpers shared by teacher families: weights loading and NCHW -> (summary, NHWC dense)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from radio_dist.teacher import TeacherRuntime, TeacherSpec, WeightsKind, resolve_weights_path
from radio_dist.weights import read_state_dict


def cpu_runtime() -> TeacherRuntime:
    """Runtime of the small CPU teachers: two single-threaded actors per teacher, a quarter of a Ray CPU each.

    With one actor per teacher each stage is capped at one core, and the faster stage waits for the slower
    one while nothing else can run: on a 2-core machine 0.07-0.15 of the two CPUs sat idle (sampled from
    /proc/stat every 0.5 s over 1024-view runs). Two actors per teacher keep a runnable forward on every core (idle
    0.00 in the same sampling). A quarter CPU each leaves Ray room for decode and write tasks on two cores.
    """
    return TeacherRuntime(pool_size=2, num_cpus=0.25)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file (weights only, never pickled code); a missing, truncated
    or foreign file is a ``WeightsError`` naming it."""
    return read_state_dict(path)


def seeded_init(spec: TeacherSpec) -> None:
    """Random-init teachers must be identical in every actor: seed before building the module."""
    if spec.weights.kind == WeightsKind.none:
        torch.manual_seed(spec.weights.seed)


def weights_path(spec: TeacherSpec) -> Path | None:
    return resolve_weights_path(spec.weights)


def dense_blocks_option(spec: TeacherSpec, total: int) -> tuple[dict[str, Any], int | None]:
    """(the family's constructor options without ``dense_blocks``, ``dense_blocks`` or None).

    ``options.dense_blocks: N`` takes a CNN teacher's dense features after its first N blocks instead of its
    final stage: earlier stages are more local, and a student learns them from far fewer photos."""
    opts = dict(spec.family_options())
    n = opts.pop("dense_blocks", None)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= total):
        raise ValueError(
            f"teacher {spec.name!r}: options.dense_blocks must be an int in 1..{total} (the blocks run before "
            f"the dense features are taken; leave it out for the final stage), got {n!r}"
        )
    return opts, n


def check_dense_stride(
    spec: TeacherSpec, trunk: Callable[[torch.Tensor], torch.Tensor], blocks: int, model: torch.nn.Module
) -> None:
    """A truncated trunk's output stride must be the spec's ``patch_size`` (the store's grid follows it)."""
    param = next(iter(model.parameters()))
    with torch.no_grad():
        side = int(trunk(torch.zeros(1, 3, 64, 64, device=param.device, dtype=param.dtype)).shape[-1])
    stride = 64 // side
    if stride != spec.patch_size:
        raise ValueError(
            f"teacher {spec.name!r}: its dense features after {blocks} blocks are at stride {stride}, but "
            f"patch_size is {spec.patch_size}; set patch_size: {stride}"
        )


def cnn_outputs(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,C,h,w] feature map -> (global-average summary [B,C], dense [B,h,w,C])."""
    return feat.mean(dim=(2, 3)), feat.permute(0, 2, 3, 1)
