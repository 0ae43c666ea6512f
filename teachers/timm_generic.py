"""Any timm architecture with a local weights file (or random init for tiny test configs).

ViTs: dense = patch tokens with the prefix tokens (CLS + registers) dropped and reshaped to the grid;
summary = CLS token (``summary: cls``) or timm's head pooling (``pooled``/``map``: avg or attention pool).
CNNs: dense = ``forward_features``; summary = the head's pooling. Weights never come from a hub unless
the spec says ``weights.kind: hub``.
"""

from __future__ import annotations

from typing import Any

import timm
import torch

from radio_dist.teacher import Teacher, TeacherSpec, WeightsKind, register_teacher
from teachers._common import cnn_outputs, load_state_dict, seeded_init, weights_path


class TimmTeacher(Teacher):
    def __init__(self, spec: TeacherSpec) -> None:
        super().__init__(spec)
        if not spec.arch:
            raise ValueError(f"teacher {spec.name!r} (family timm) needs `arch`: a timm model name")
        seeded_init(spec)
        hub = spec.weights.kind == WeightsKind.hub
        kwargs = spec.family_options()
        if hub:
            kwargs["pretrained_cfg_overlay"] = {"hf_hub_id": spec.weights.hub_id}
        self.model: Any = timm.create_model(spec.arch, pretrained=hub, **kwargs)
        path = weights_path(spec)
        if path is not None:
            missing, unexpected = self.model.load_state_dict(load_state_dict(path), strict=False)
            if missing:
                raise ValueError(
                    f"{path}: weights lack {len(missing)} tensors of {spec.arch}, e.g. {missing[:3]}"
                )
            if unexpected:  # e.g. a classifier head we do not use; anything else is a wrong file
                bad = [k for k in unexpected if not k.startswith(("head.", "fc.", "classifier."))]
                if bad:
                    raise ValueError(f"{path}: {len(bad)} tensors not in {spec.arch}, e.g. {bad[:3]}")
        self.is_vit = hasattr(self.model, "num_prefix_tokens")
        self.prefix = (
            spec.num_prefix_tokens
            if spec.num_prefix_tokens is not None
            else int(getattr(self.model, "num_prefix_tokens", 0))
        )

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        feats = self.model.forward_features(x)
        if not self.is_vit:
            summary, dense = cnn_outputs(feats)
            if self.spec.summary != "pooled":
                summary = self.model.forward_head(feats, pre_logits=True)
            return (None if self.spec.summary == "none" else summary), dense
        patch = self.spec.patch_size or self.model.patch_embed.patch_size[0]
        h, w = x.shape[-2] // patch, x.shape[-1] // patch
        tokens = feats[:, self.prefix :]
        if tokens.shape[1] != h * w:
            raise ValueError(
                f"teacher {self.spec.name}: {tokens.shape[1]} patch tokens after dropping {self.prefix} prefix "
                f"tokens, expected {h}x{w} for a {x.shape[-1]} px input with patch {patch}"
            )
        dense = tokens.reshape(x.shape[0], h, w, -1)
        if self.spec.summary == "none":
            return None, dense
        if self.spec.summary == "cls":
            return feats[:, 0], dense
        return self.model.forward_head(feats, pre_logits=True), dense


register_teacher(
    "timm", description="Any timm architecture (`arch`) with a local weights file (`weights.path`)"
)(TimmTeacher)
