"""SAM3's image encoder on timm's Perception Encoder modules; dense = encoder output tokens; mosaic.

SAM3's image encoder is a ViTDet-style ViT (1008 px, patch 14 -> 72x72 tokens, 1024-d, 32 blocks,
MLP ratio 4.625, no CLS token in the sequence, LayerNorm before the blocks and none after). Its blocks
are those of timm's Perception Encoder (``vit_pe_spatial_*``: patch embed without bias, pre-norm, RoPE
attention with qkv bias, GELU MLP), and a converted checkpoint loads into that architecture key for key.
What SAM3 does differently is the forward, reproduced here on timm's modules:

* windowed attention (``options.window_size``, SAM3: 24) in every block except ``options.global_blocks``
  (SAM3: 7, 15, 23, 31; default: the last block of each quarter of the depth); windows are zero-padded
  after the block's first norm, as in SAM3;
* 2-D axial RoPE (theta 1e4, interleaved pairs): window-local positions in windowed blocks; in global
  blocks positions scaled so the whole input spans one window (SAM3's ``use_interp_rope``; at 1008 px
  that is a factor 24/72);
* absolute position embedding of one window (SAM3's 24x24 pretraining grid) *tiled* over the input.

Pixels: SAM3's own processor squashes to 1008 px and normalizes with mean = std = 0.5 (set in the spec).
Dense = the encoder's output tokens ``[B, h, w, C]`` (SAM3's trunk output, before the FPN neck). There is
no summary unless the spec names one (``summary: pooled`` = mean of the output tokens; default presets
use ``none``).

**Mosaic** (``adaptation: mosaic``, ``options.mosaic_k = k``): a batch whose input size (after the spec's
per-partition ``resolution``) times k equals the native size (``options.img_size``) is tiled k x k into
native inputs, run once, and cut back (``teachers.mosaic``); native-size batches run as they are; any
other size is an error. N low-partition views cost ceil(N / k^2) encoder inputs (``model_inputs``).
With SAM3's numbers (k = 3, 336 px views, 24x24 tiles) every window is exactly one tile and the tiled
position embedding is the same in every tile, so windowed blocks see each view as if alone; only the
four global blocks mix tiles and rescale RoPE. Mosaic targets therefore depend (slightly) on which views
share a mosaic: consecutive ok rows of a teacher batch.

Real weights: SAM3's checkpoint (``sam3.pt`` from https://huggingface.co/facebook/sam3, gated: accept the
licence, then ``huggingface-cli download facebook/sam3 sam3.pt --local-dir D`` on a machine with network
access) holds the whole detector; convert its image-encoder trunk once, offline::

    python -m teachers.sam3 convert D/sam3.pt /weights/sam3_encoder.safetensors

(keeps the keys under ``...trunk.``, renames ``ln_pre`` -> ``norm_pre``, drops the RoPE buffers and the
CLS position, tiles the 24x24 position embedding to 72x72). A job entry::

    - {name: sam3, family: sam3, arch: vit_pe_spatial_large_patch14_448, patch_size: 14,
       num_prefix_tokens: 0, summary: none, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5],
       adaptation: mosaic, resolution: {low: 336, high: 1008},
       options: {img_size: 1008, depth: 32, mlp_ratio: 4.625, window_size: 24,
                 global_blocks: [7, 15, 23, 31], mosaic_k: 3},
       runtime: {batch_size: 18}, weights: {kind: file, path: /weights/sam3_encoder.safetensors}}

The preset ``sam3_tiny`` is a random-init config of the same design (patch 14, 112 px native = 8x8
tokens, 4x4 windows, mosaic k = 2 for 56 px low-partition views) for tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from radio_dist.teacher import (
    TeacherRuntime,
    TeacherSpec,
    WeightsKind,
    WeightsSpec,
    register_teacher,
)
from teachers._vit import TimmViTTeacher
from teachers.mosaic import MOSAIC, MOSAIC_K, mosaic_k, tile, untile

ROPE_THETA = 10000.0


def tiny_spec() -> TeacherSpec:
    """Random-init test config of SAM3's design: 64-d, 4 blocks (last one global), 8x8 native tokens."""
    return TeacherSpec(
        name="sam3_tiny",
        family="sam3",
        arch="vit_pe_spatial_tiny_patch16_512",
        weights=WeightsSpec(kind=WeightsKind.none, seed=0),
        patch_size=14,
        num_prefix_tokens=0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        summary="none",
        adaptation=MOSAIC,
        resolution={"low": 56, "high": 112},
        options={
            "img_size": 112,
            "patch_size": 14,
            "embed_dim": 64,
            "depth": 4,
            "num_heads": 2,
            "mlp_ratio": 4.625,
            "window_size": 4,
            "global_blocks": [3],
            MOSAIC_K: 2,
        },
        runtime=TeacherRuntime(batch_size=16),
    )


def window_partition(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, H, W, C]`` -> ``[B * nW, ws * ws, C]`` windows (zero-padded to multiples of ws), padded (H, W)."""
    b, h, w, c = x.shape
    ph, pw = -h % ws, -w % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, ws: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition` (padding removed)."""
    (hp, wp), (h, w) = padded, size
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // ws) * (wp // ws))
    x = windows.reshape(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return x[:, :h, :w]


def axial_rope(h: int, w: int, head_dim: int, scale: float, device: torch.device) -> torch.Tensor:
    """SAM3's 2-D axial RoPE for an h x w grid (row-major) in timm's ``cat([sin, cos])`` layout.

    head_dim/4 frequencies per axis, x (column) angles first then y (row), each angle rotating one
    interleaved pair of channels: returns ``[h*w, 2*head_dim]``.
    """
    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4] / head_dim))
    t = torch.arange(h * w, device=device)
    tx, ty = (t % w).float() * scale, torch.div(t, w, rounding_mode="floor").float() * scale
    angles = torch.cat([torch.outer(tx, freqs), torch.outer(ty, freqs)], dim=-1)  # [h*w, head_dim/2]
    angles = angles.repeat_interleave(2, dim=-1)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SAM3Encoder(TimmViTTeacher):
    family = "sam3"
    summaries = ("none", "pooled")
    reserved_options = ("window_size", "global_blocks")
    model_defaults = {"class_token": False}  # SAM3 keeps no CLS token in the sequence

    @staticmethod
    def arch_ok(arch: str) -> bool:
        return arch.startswith("vit_pe_spatial_")

    @staticmethod
    def arch_hint() -> str:
        return "a timm Perception Encoder spatial ViT, e.g. vit_pe_spatial_large_patch14_448 for SAM3"

    def __init__(self, spec: TeacherSpec) -> None:
        super().__init__(spec)
        m = self.model
        if self.prefix != 0 or m.pos_embed is None:
            raise ValueError(
                f"teacher {spec.name!r}: SAM3's encoder has no prefix tokens and an absolute position "
                "embedding; remove class_token/num_reg_tokens/use_abs_pos_emb from options"
            )
        depth = len(m.blocks)
        self.window = int(spec.options.get("window_size", 24))
        gb = spec.options.get("global_blocks")
        self.global_blocks = (
            {int(i) for i in gb} if gb is not None else {max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)}
        )
        if self.window < 1 or not all(0 <= i < depth for i in self.global_blocks):
            raise ValueError(
                f"teacher {spec.name!r}: window_size must be >= 1 and global_blocks within 0..{depth - 1}; "
                f"got window_size={self.window}, global_blocks={sorted(self.global_blocks)}"
            )
        blk = m.blocks[0]
        if not all(hasattr(blk, a) for a in ("norm1", "attn", "gamma_1", "norm2", "mlp", "gamma_2")):
            raise ValueError(f"teacher {spec.name!r}: {spec.arch} does not use pre-norm EVA blocks")
        self.head_dim = m.embed_dim // m.blocks[0].attn.num_heads
        if self.head_dim % 4:
            raise ValueError(
                f"teacher {spec.name!r}: head dim {self.head_dim} must be a multiple of 4 (RoPE)"
            )
        self.native = int(m.patch_embed.img_size[0])
        g = self.native // self.patch
        if m.pos_embed.shape[1] != g * g or g < self.window:
            raise ValueError(
                f"teacher {spec.name!r}: position embedding of {m.pos_embed.shape[1]} tokens does not fit a "
                f"{g}x{g} native grid holding a {self.window}x{self.window} window"
            )
        self.k = mosaic_k(spec)
        if self.k is not None and (self.native % self.k or (self.native // self.k) % self.patch):
            raise ValueError(
                f"teacher {spec.name!r}: native size {self.native} px does not split into {self.k}x{self.k} "
                f"views of whole {self.patch} px patches; choose mosaic_k dividing {g}"
            )

    @property
    def tile_px(self) -> int | None:
        """Input size of the views that are mosaicked (None without mosaic)."""
        return None if self.k is None else self.native // self.k

    def _abs_pos(self, h: int, w: int) -> torch.Tensor:
        """One window of the position table, tiled over an h x w grid (SAM3's ``tile_abs_pos``)."""
        g = self.native // self.patch
        base = self.model.pos_embed.reshape(g, g, -1)[: self.window, : self.window]
        reps = (-(-h // self.window), -(-w // self.window))
        return base.repeat(reps[0], reps[1], 1)[:h, :w]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized ``[B, 3, H, W]`` -> encoder output ``[B, H/p, W/p, C]`` (one model forward)."""
        m = self.model
        t = m.patch_embed(x)  # [B, h, w, C] (dynamic_img_size: NHWC)
        b, h, w, c = t.shape
        self.model_inputs += b
        t = m.norm_pre(t + self._abs_pos(h, w))
        ws = self.window
        rope_win = axial_rope(ws, ws, self.head_dim, 1.0, t.device)
        rope_glob = axial_rope(h, w, self.head_dim, ws / h, t.device)
        for i, blk in enumerate(m.blocks):
            y = blk.norm1(t)
            if i in self.global_blocks:
                y = blk.attn(y.reshape(b, h * w, c), rope=rope_glob).reshape(b, h, w, c)
            else:
                win, padded = window_partition(y, ws)
                y = window_unpartition(blk.attn(win, rope=rope_win), ws, padded, (h, w))
            if blk.gamma_1 is not None:
                y = blk.gamma_1 * y
            t = t + y
            z = blk.mlp(blk.norm2(t))
            if blk.gamma_2 is not None:
                z = blk.gamma_2 * z
            t = t + z
        return m.norm(t)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        size = (x.shape[-2], x.shape[-1])
        if self.k is not None and size == (self.tile_px, self.tile_px):
            mosaics, n = tile(x.permute(0, 2, 3, 1), self.k)
            dense = untile(self.encode(mosaics.permute(0, 3, 1, 2)), self.k, n)
        elif self.k is not None and size != (self.native, self.native):
            raise ValueError(
                f"teacher {self.spec.name}: with mosaic k={self.k} the input must be {self.tile_px} px "
                f"(mosaicked) or {self.native} px (native), got {size[0]}x{size[1]}; set the spec's "
                "`resolution` for this partition to one of them"
            )
        else:
            dense = self.encode(x)
        return (dense.mean(dim=(1, 2)) if self.spec.summary == "pooled" else None), dense


register_teacher(
    "sam3",
    description="SAM3 image encoder (windowed ViT on timm vit_pe_spatial_* modules) from a converted "
    "weights file; dense = encoder tokens; mosaic for the low partition. Preset sam3_tiny: random-init "
    "tiny test config, not pretrained",
    default_spec=tiny_spec,
    adaptations=(MOSAIC,),
)(SAM3Encoder)


# --------------------------------------------------------------------------------------------------------
# Converting SAM3's checkpoint (offline, once)
# --------------------------------------------------------------------------------------------------------


def convert_sam3_checkpoint(
    state_dict: dict[str, torch.Tensor], native_grid: int = 72
) -> dict[str, torch.Tensor]:
    """SAM3 checkpoint -> image-encoder state dict in timm ``vit_pe_spatial_*`` layout (see module doc)."""
    suffix = "patch_embed.proj.weight"
    found = [k[: -len(suffix)] for k in state_dict if k.endswith(suffix)]
    if not found:
        raise ValueError(f"no '*{suffix}' in the checkpoint: not a SAM3 (ViTDet) checkpoint")
    # the detector's image trunk (``detector.backbone.vision_backbone.trunk.``) before any other copy
    prefix = min(found, key=lambda p: ("trunk." not in p, "detector." not in p, len(p)))
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.endswith(("freqs_cis", "freqs_cis_real", "freqs_cis_imag", "relative_coords")):
            continue  # RoPE / rel-pos buffers: recomputed by the adapter
        if name.startswith("ln_post."):
            raise ValueError("checkpoint has ln_post: not SAM3's encoder layout (ln_post=False)")
        name = name.replace("ln_pre.", "norm_pre.", 1)
        if name == "pos_embed":
            pos = value[:, 1:] if int(value.shape[1] ** 0.5) ** 2 != value.shape[1] else value  # drop CLS pos
            g0 = int(pos.shape[1] ** 0.5)
            if native_grid % g0:
                raise ValueError(f"position grid {g0} does not tile a {native_grid}-token native grid")
            r = native_grid // g0
            value = pos.reshape(1, g0, g0, -1).repeat(1, r, r, 1).reshape(1, native_grid * native_grid, -1)
        out[name] = value.contiguous()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m teachers.sam3", description="SAM3 encoder weights tools."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="SAM3 checkpoint -> encoder safetensors for weights.kind=file")
    conv.add_argument("src", type=Path, help="SAM3 checkpoint (sam3.pt)")
    conv.add_argument("dst", type=Path, help="output .safetensors")
    conv.add_argument("--native-grid", type=int, default=72, help="tokens per side at native size (1008/14)")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    from teachers._common import load_state_dict

    sd: Any = load_state_dict(args.src)
    out = convert_sam3_checkpoint(sd, args.native_grid)
    save_file(out, str(args.dst))
    print(
        f"wrote {len(out)} tensors ({sum(v.numel() for v in out.values()) / 1e6:.1f} M params) to {args.dst}"
    )


if __name__ == "__main__":
    main()
