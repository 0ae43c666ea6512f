"""What the timm-ViT seed teachers (DINOv3, SigLIP2, SAM3) share: build, load weights, check the spec.

``spec.options`` are timm keyword overrides of the architecture (that is how the tiny random-init test
configs shrink ``embed_dim``/``depth``/``num_heads``/``img_size``); a family removes its own reserved keys
first. Every model is built with ``num_classes=0`` (no classifier) and ``dynamic_img_size=True`` (any input
size, so one teacher serves partitions of different resolutions).

Weights: ``kind: file`` goes through timm's own loader (``pretrained_cfg_overlay=dict(file=PATH)``), so
timm's checkpoint filters apply (original Meta DINOv3 ``.pth`` files are remapped; big_vision ``.npz``
files load through timm's npz reader); ``kind: none`` is a seeded random init, identical in every actor.
"""

from __future__ import annotations

from typing import Any

import timm
import torch

from radio_dist.teacher import Teacher, TeacherSpec, WeightsKind
from radio_dist.weights import check_weights_file
from teachers._common import seeded_init, weights_path

FIXED_KWARGS: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}


def build_timm_vit(
    spec: TeacherSpec, kwargs: dict[str, Any], defaults: dict[str, Any] | None = None
) -> torch.nn.Module:
    """``timm.create_model(spec.arch, **defaults, **kwargs)`` with the spec's weights loaded."""
    assert spec.arch, "the family checked spec.arch"
    for key, value in FIXED_KWARGS.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(
                f"teacher {spec.name!r}: options.{key}={kwargs[key]!r} is not supported "
                f"(teachers are built with {key}={value!r}); remove it from options"
            )
    build = {**(defaults or {}), **kwargs, **FIXED_KWARGS}
    seeded_init(spec)
    pretrained = False
    overlay: dict[str, Any] = {}
    path = weights_path(spec)
    if path is not None:
        check_weights_file(path)  # a truncated or foreign file is named here, not deep inside timm
        pretrained = True
        overlay = {"file": str(path)}
        if path.suffix == ".npz":  # an original big_vision (JAX) checkpoint: timm's npz reader
            overlay["custom_load"] = True
    elif spec.weights.kind == WeightsKind.hub:
        pretrained = True
        overlay = {"hf_hub_id": spec.weights.hub_id}
    try:
        return timm.create_model(spec.arch, pretrained=pretrained, pretrained_cfg_overlay=overlay, **build)
    except (RuntimeError, KeyError, ValueError) as e:
        if path is None:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"teacher {spec.name!r}: weights file {path} does not fit timm {spec.arch!r} with options "
            f"{kwargs}: {first[:500]} — check arch/options match the checkpoint (see the family's docstring "
            "for how to get and convert it)"
        ) from e


def check_geometry(spec: TeacherSpec, model: Any) -> tuple[int, int]:
    """The spec's patch size and prefix-token count, checked against the built model (None = the model's)."""
    patch = int(model.patch_embed.patch_size[0])
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    if spec.patch_size is not None and spec.patch_size != patch:
        raise ValueError(
            f"teacher {spec.name!r}: spec patch_size={spec.patch_size} but {spec.arch} (options {spec.options}) "
            f"has patch {patch}; fix patch_size or options.patch_size"
        )
    if spec.num_prefix_tokens is not None and spec.num_prefix_tokens != prefix:
        raise ValueError(
            f"teacher {spec.name!r}: spec num_prefix_tokens={spec.num_prefix_tokens} but {spec.arch} has "
            f"{prefix} prefix tokens (CLS + registers); fix num_prefix_tokens or the options"
        )
    return patch, prefix


class TimmViTTeacher(Teacher):
    """Base of the seed ViT teachers: arch check, build + load, geometry check, tokens -> grid."""

    family = ""
    summaries: tuple[str, ...] = ()  # the spec.summary values this family supports
    reserved_options: tuple[str, ...] = ()  # family options that are not timm constructor arguments
    model_defaults: dict[str, Any] = {}

    def __init__(self, spec: TeacherSpec) -> None:
        super().__init__(spec)
        if not spec.arch or not self.arch_ok(spec.arch):
            raise ValueError(
                f"teacher {spec.name!r} (family {self.family}) needs `arch`: {self.arch_hint()}; got {spec.arch!r}"
            )
        if spec.summary not in self.summaries:
            raise ValueError(
                f"teacher {spec.name!r} (family {self.family}): summary {spec.summary!r} is not available; "
                f"use one of {', '.join(self.summaries)}"
            )
        self.timm_kwargs = {k: v for k, v in spec.family_options().items() if k not in self.reserved_options}
        self.model: Any = build_timm_vit(spec, self.timm_kwargs, self.model_defaults)
        self.patch, self.prefix = check_geometry(spec, self.model)

    @staticmethod
    def arch_ok(arch: str) -> bool:
        raise NotImplementedError  # abstract: each family names its architectures

    @staticmethod
    def arch_hint() -> str:
        raise NotImplementedError

    def grid(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[B, prefix + h*w, C]`` tokens -> ``[B, h, w, C]`` patch grid (prefix tokens dropped)."""
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        patches = tokens[:, self.prefix :]
        if patches.shape[1] != h * w:
            raise ValueError(
                f"teacher {self.spec.name}: {patches.shape[1]} patch tokens after dropping {self.prefix} prefix "
                f"tokens, expected {h}x{w} for a {x.shape[-2]}x{x.shape[-1]} px input with patch {self.patch}"
            )
        return patches.reshape(x.shape[0], h, w, -1)
