"""Helpers shared by teacher families: weights loading and NCHW -> (summary, NHWC dense)."""

from __future__ import annotations

from pathlib import Path

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


def cnn_outputs(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,C,h,w] feature map -> (global-average summary [B,C], dense [B,h,w,C])."""
    return feat.mean(dim=(2, 3)), feat.permute(0, 2, 3, 1)
