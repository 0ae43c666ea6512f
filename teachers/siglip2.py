"""SigLIP / SigLIP2 image towers (timm ``vit_*_siglip_*``): summary = MAP-head output, dense = patch tokens.

SigLIP ViTs have no CLS token (``num_prefix_tokens: 0``); the image embedding that is aligned with text is
the output of the multi-head attention-pooling (MAP) head, which timm exposes as
``forward_head(..., pre_logits=True)`` — that is the summary (``summary: map``). Dense targets are the
final-normed patch tokens. Pixels are normalized with mean = std = 0.5. The ``*_siglip_gap_*`` variants
have no MAP head; use ``summary: pooled`` (their average pooling) or ``none`` with them.

Real weights (C-RADIOv4 uses SigLIP2-g-384, ``arch: vit_giantopt_patch16_siglip_384``, 1536-d, 24x24
tokens at 384 px) — either file works as ``weights: {kind: file, path: ...}``:

* timm's copy of the image tower, ``timm/vit_giantopt_patch16_siglip_384.v2_webli``
  (``model.safetensors``), fetched once on a machine with network access:
  ``huggingface-cli download timm/vit_giantopt_patch16_siglip_384.v2_webli model.safetensors --local-dir D``;
* the original big_vision checkpoint (``.npz``, from the SigLIP2 release in
  https://github.com/google-research/big_vision): read by timm's npz loader (``params/img/...``); a
  ``.npz`` path is recognised by its suffix, no conversion step needed.

A job entry::

    - {name: siglip2, family: siglip2, arch: vit_giantopt_patch16_siglip_384, patch_size: 16,
       num_prefix_tokens: 0, summary: map, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5],
       resolution: {low: 384}, only_partitions: [low],
       weights: {kind: file, path: /weights/siglip2_g384.safetensors}}

The high partition (1152 px = 72x72 tokens) goes through FeatSharp, which works for any family: train it with
``radio-dist featsharp train`` (``jobs/configs/featsharp_sample.yaml``, ``deploy/kuberay/rayjob-featsharp.yaml``),
then add ``adaptation: featsharp``, ``options: {featsharp: OUT/featsharp.safetensors}`` and
``resolution: {low: 384, high: 1152}`` to the entry above (drop ``only_partitions``); see docs/featsharp.md.
The preset ``siglip2_tiny`` is a random-init 2-block, 64-d config of the same architecture for tests.
"""

from __future__ import annotations

import torch

from radio_dist.teacher import TeacherSpec, WeightsKind, WeightsSpec, register_teacher
from teachers._vit import TimmViTTeacher


def tiny_spec() -> TeacherSpec:
    """Random-init test config: SigLIP's architecture (MAP head) at 64-d, 2 blocks (no pretrained weights)."""
    return TeacherSpec(
        name="siglip2_tiny",
        family="siglip2",
        arch="vit_base_patch16_siglip_224",
        weights=WeightsSpec(kind=WeightsKind.none, seed=0),
        patch_size=16,
        num_prefix_tokens=0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        summary="map",
        options={"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64},
    )


class SigLIP2(TimmViTTeacher):
    family = "siglip2"
    summaries = ("map", "pooled", "none")  # map and pooled both mean timm's head pooling (MAP for SigLIP)

    @staticmethod
    def arch_ok(arch: str) -> bool:
        return arch.startswith("vit_") and "_siglip" in arch

    @staticmethod
    def arch_hint() -> str:
        return "a timm SigLIP ViT such as vit_giantopt_patch16_siglip_384 (SigLIP2-g-384)"

    def __init__(self, spec: TeacherSpec) -> None:
        super().__init__(spec)
        if spec.summary == "map" and getattr(self.model, "attn_pool", None) is None:
            raise ValueError(
                f"teacher {spec.name!r}: summary 'map' needs a MAP head but {spec.arch} pools with "
                f"{self.model.global_pool!r}; use a *_siglip_* arch with a MAP head or summary: pooled"
            )

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        feats = self.model.forward_features(x)  # [B, h*w, C], final norm applied
        dense = self.grid(feats, x)
        if self.spec.summary == "none":
            return None, dense
        return self.model.forward_head(feats, pre_logits=True), dense


register_teacher(
    "siglip2",
    description="SigLIP2 image tower (timm *_siglip_*) from a local weights file; summary = MAP head, "
    "dense = patch tokens. Preset siglip2_tiny: random-init tiny test config, not pretrained",
    default_spec=tiny_spec,
)(SigLIP2)
