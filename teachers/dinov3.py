"""DINOv3 (timm ``vit_*_patch16_dinov3``): dense = patch tokens, summary = CLS.

timm's DINOv3 ViTs carry 1 CLS + 4 register tokens (``num_prefix_tokens: 5``), RoPE positions (any input
size) and a final LayerNorm; dense targets are the normed patch tokens with the 5 prefix tokens dropped
(DINOv3's ``x_norm_patchtokens``), the summary is the normed CLS token (``x_norm_clstoken``). Pixels are
normalized with ImageNet mean/std.

Real weights (C-RADIOv4 uses DINOv3-7B, ``arch: vit_7b_patch16_dinov3``, 4096-d) — either file works as
``weights: {kind: file, path: ...}``:

* the original Meta checkpoint (request access at https://ai.meta.com/dinov3/, e.g.
  ``dinov3_vit7b16_pretrain_lvd1689m-*.pth``): timm's DINOv3 checkpoint filter remaps its keys
  (``storage_tokens`` -> ``reg_token``, ...) while loading, no conversion step needed;
* timm's copy ``timm/vit_7b_patch16_dinov3.lvd1689m`` (``model.safetensors``), fetched once on a machine
  with network access: ``huggingface-cli download timm/vit_7b_patch16_dinov3.lvd1689m model.safetensors --local-dir D``.

Smaller DINOv3 ViTs (``vit_{small,base,large,huge_plus}_patch16_dinov3``) work the same way. A job entry::

    - {name: dinov3, family: dinov3, arch: vit_7b_patch16_dinov3, patch_size: 16, num_prefix_tokens: 5,
       summary: cls, weights: {kind: file, path: /weights/dinov3_vit7b16.pth}}

The preset ``dinov3_tiny`` is a random-init 2-block, 64-d config of the same architecture for tests.
"""

from __future__ import annotations

import torch

from radio_dist.teacher import TeacherSpec, WeightsKind, WeightsSpec, register_teacher
from teachers._vit import TimmViTTeacher

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tiny_spec() -> TeacherSpec:
    """Random-init test config: DINOv3's architecture at 64-d, 2 blocks (no pretrained weights)."""
    return TeacherSpec(
        name="dinov3_tiny",
        family="dinov3",
        arch="vit_small_patch16_dinov3",
        weights=WeightsSpec(kind=WeightsKind.none, seed=0),
        patch_size=16,
        num_prefix_tokens=5,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        summary="cls",
        options={"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64},
    )


class DINOv3(TimmViTTeacher):
    family = "dinov3"
    summaries = ("cls", "pooled", "none")  # pooled = timm's head pooling (mean of the patch tokens)

    @staticmethod
    def arch_ok(arch: str) -> bool:
        return arch.endswith(("_dinov3", "_dinov3_qkvb"))

    @staticmethod
    def arch_hint() -> str:
        return "a timm DINOv3 ViT such as vit_7b_patch16_dinov3 or vit_large_patch16_dinov3"

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        feats = self.model.forward_features(x)  # [B, prefix + h*w, C], final norm applied
        dense = self.grid(feats, x)
        if self.spec.summary == "cls":
            return feats[:, 0], dense
        if self.spec.summary == "pooled":
            return self.model.forward_head(feats, pre_logits=True), dense
        return None, dense


register_teacher(
    "dinov3",
    description="DINOv3 ViT (timm *_patch16_dinov3) from a local weights file; dense = patch tokens, "
    "summary = CLS. Preset dinov3_tiny: random-init tiny test config, not pretrained",
    default_spec=tiny_spec,
)(DINOv3)
