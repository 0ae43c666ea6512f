"""Students: the C-RADIO ViT and timm backbones, each with one (summary, dense) adaptor head pair per teacher.

Every student maps float images ``[B, 3, H, W]`` in ``[0, 1]`` (``H, W`` multiples of ``patch_size``) to a
:class:`StudentOutput`: per teacher a summary ``[B, summary_dim]`` (or None) and a channels-last dense map
``[B, g_h*u, g_w*u, dense_dim]`` in PHI-S space, plus the backbone's patch features (for MESA). Pixel
normalization happens inside, so the training loop and :func:`load_student` feed the same ``[0, 1]`` input.

The C-RADIO student (``kind="cradio"``) is a ViT with one summary token per teacher, register tokens and a
CPE position embedding that works at any resolution; optionally ViTDet windowed attention. Smaller students
(``kind="timm"``) are any timm backbone. :func:`export_student` writes ``model.safetensors`` + ``config.json``
(+ the PHI-S transforms) and :func:`load_student` turns such a folder back into a ready inference module.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from pydantic import Field, field_validator, model_validator
from safetensors.torch import save_file
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from radio_dist.config import StrictModel
from radio_dist.phis import PhiS
from radio_dist.weights import read_state_dict

EXPORT_FORMAT = "radio-dist-student/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

# C-RADIO presets: the widths/depths of timm's vit_*_patch16_radio_v3/v4 (RADIO trains with qkv bias and, for
# B/L, LayerScale 1e-5). "tiny" is a test-sized config of the same architecture.
CRADIO_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, init_values=None),
    "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, init_values=None),
    "base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, init_values=1e-5),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, init_values=1e-5),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, init_values=None),
    "so400m": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152, init_values=None),
}
CRADIO_OVERRIDES = (
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "init_values",
    "qkv_bias",
    "drop_path_rate",
)


# -- config -------------------------------------------------------------------------------------------------
class TeacherHeadInfo(StrictModel):
    """What a student must predict for one teacher (taken from the store's metadata)."""

    summary_dim: int | None = Field(description="Width of the teacher's summary vector; None = no summary.")
    dense_dim: int = Field(ge=1, description="Channels of the teacher's dense (PHI-S space) feature map.")

    @field_validator("summary_dim")
    @classmethod
    def _summary_dim_ok(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"summary_dim must be >= 1 or None (teacher without summary), got {v}")
        return v


class StudentSpec(StrictModel):
    """One student: backbone, head shapes and pixel normalization. Teachers come from the store."""

    name: str = Field(description="Unique student name (letters, digits, '_' or '-'); names its outputs.")
    kind: Literal["cradio", "timm"] = Field(description="cradio: the C-RADIO ViT; timm: any timm backbone.")
    arch: str = Field(
        description="cradio: a preset (tiny | small | base | large | huge | so400m); timm: an architecture "
        "name such as vit_small_patch16_224 or convnext_atto."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Architecture kwargs. cradio: embed_dim, depth, num_heads, mlp_ratio, init_values, "
        "qkv_bias, drop_path_rate; timm: any timm.create_model kwarg (e.g. embed_dim/depth, dims/depths).",
    )
    patch_size: int = Field(16, ge=1, description="cradio patch size in px (timm: from the model's stride).")
    num_registers: int = Field(
        4, ge=0, description="cradio register tokens (besides one summary per teacher)."
    )
    window_size: int | None = Field(
        None, ge=1, description="cradio ViTDet windowed attention, tokens per window side; None = all global."
    )
    global_every: int = Field(4, ge=1, description="With window_size: every k-th block attends globally.")
    cpe_max_grid: int = Field(64, ge=1, description="cradio CPE position-embedding grid (tokens per side).")
    head_hidden: int = Field(256, ge=1, description="Hidden width of the MLP2 adaptor heads.")
    head_blocks: int = Field(1, ge=0, description="Residual blocks in each MLP2 adaptor head.")
    dense_upsample: int = Field(
        1, ge=1, description="Pixel-shuffle factor u of the dense heads (output grid = u x student grid)."
    )
    weights: str | None = Field(
        None,
        description="Local file that initializes the backbone (timm: a timm checkpoint; cradio: a backbone "
        "state dict or an exported model.safetensors). None = random init.",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Data parallelism over the job's workers: ddp (a full copy per worker) or fsdp (FSDP2, "
        "parameters, gradients and optimizer state sharded per block: students too large for one device).",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each backbone block's activations in the backward pass instead of keeping them "
        "(large students: less memory, about a third more compute).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the student's training forward (and backward). Each new input shape "
        "compiles once (the first steps at each resolution are slow); DAMP then puts its noise into the "
        "weights in place, so the compiled graph is reused.",
    )
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="Pixel mean in [0,1] RGB.")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="Pixel std in [0,1] RGB.")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name {v!r} must be non-empty and use only letters, digits, '_' or '-'")
        return v

    @field_validator("std")
    @classmethod
    def _std_ok(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(s > 0 for s in v):
            raise ValueError(f"std must be > 0 in every channel, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StudentSpec:
        if self.kind == "cradio":
            if self.arch not in CRADIO_PRESETS:
                raise ValueError(
                    f"arch {self.arch!r} is not a cradio preset; use one of {sorted(CRADIO_PRESETS)}"
                )
            unknown = sorted(set(self.overrides) - set(CRADIO_OVERRIDES))
            if unknown:
                raise ValueError(
                    f"overrides {unknown} are not cradio options; allowed: {list(CRADIO_OVERRIDES)}"
                )
            dims = self.cradio_dims()
            for key in ("embed_dim", "depth", "num_heads"):
                if not isinstance(dims[key], int) or dims[key] < 1:
                    raise ValueError(f"overrides.{key} must be a positive int, got {dims[key]!r}")
            if dims["embed_dim"] % dims["num_heads"]:
                raise ValueError(
                    f"overrides: embed_dim {dims['embed_dim']} must be divisible by num_heads {dims['num_heads']}"
                )
            if self.window_size is not None and self.global_every == 1:
                raise ValueError(
                    "global_every=1 makes every block global, so window_size would do nothing; "
                    "set window_size=None or global_every >= 2"
                )
        else:
            if not timm.is_model(self.arch):
                raise ValueError(f"arch {self.arch!r} is not a timm architecture (see timm.list_models())")
            if self.window_size is not None:
                raise ValueError("window_size applies to cradio students only; remove it for kind=timm")
        return self

    def cradio_dims(self) -> dict[str, Any]:
        """Preset architecture with ``overrides`` applied (cradio only)."""
        return {"qkv_bias": True, "drop_path_rate": 0.0, **CRADIO_PRESETS[self.arch], **self.overrides}


@dataclass
class StudentOutput:
    heads: dict[str, tuple[Tensor | None, Tensor]]  # teacher -> (summary [B,S] | None, dense [B,h*u,w*u,C])
    features: Tensor  # backbone patch features [B, g_h, g_w, D], channels-last (for MESA)


# -- heads --------------------------------------------------------------------------------------------------
class Mlp2(nn.Module):
    """RADIO's adaptor MLP: LN-GELU-Linear, ``blocks`` residual LN-GELU-Linear, LN-GELU-Linear."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, blocks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.LayerNorm(in_dim), nn.GELU(), nn.Linear(in_dim, hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, hidden)) for _ in range(blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def pixel_shuffle_nhwc(x: Tensor, u: int) -> Tensor:
    """Channels-last ``F.pixel_shuffle``: ``[B, h, w, C*u*u] -> [B, h*u, w*u, C]`` (same channel order)."""
    if u == 1:
        return x
    b, h, w, cuu = x.shape
    c = cuu // (u * u)
    return x.reshape(b, h, w, c, u, u).permute(0, 1, 4, 2, 5, 3).reshape(b, h * u, w * u, c)


class DenseHead(nn.Module):
    """MLP2 on every patch token, ``dense_dim * u**2`` outputs pixel-shuffled to a ``u``x finer grid."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, blocks: int, upsample: int) -> None:
        super().__init__()
        self.upsample = upsample
        self.mlp = Mlp2(in_dim, hidden, out_dim * upsample * upsample, blocks)

    def forward(self, features: Tensor) -> Tensor:
        return pixel_shuffle_nhwc(self.mlp(features), self.upsample)


# -- C-RADIO backbone ---------------------------------------------------------------------------------------
def cpe_windows(pos_embed: Tensor, grid: tuple[int, int], scale: Tensor, offset: Tensor) -> Tensor:
    """Resample one window per sample of ``pos_embed [1, D, M, M]`` onto a ``grid`` (h, w) of tokens.

    ``scale [B, 2]`` and ``offset [B, 2]`` (x, y) are fractions of the embedding's extent; token centres are
    spaced evenly from the window's first to its last edge sample (``align_corners=True``), so scale 1 and
    offset 0 on a square grid equal the eval-mode resize. Returns ``[B, D, h, w]``.
    """
    h, w = grid
    b = scale.shape[0]
    dev, dt = pos_embed.device, pos_embed.dtype
    xs = torch.linspace(0, 1, w, device=dev, dtype=dt)
    ys = torch.linspace(0, 1, h, device=dev, dtype=dt)
    gx = offset[:, 0, None] + scale[:, 0, None] * xs[None]  # [B, w]
    gy = offset[:, 1, None] + scale[:, 1, None] * ys[None]  # [B, h]
    coords = torch.stack([gx[:, None, :].expand(b, h, w), gy[:, :, None].expand(b, h, w)], dim=-1)
    return F.grid_sample(
        pos_embed.expand(b, -1, -1, -1),
        coords * 2 - 1,
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )


class CPE(nn.Module):
    """Any-resolution position embedding (RADIO's CPE) learned on a ``max_grid`` x ``max_grid`` grid.

    Training: each sample sees a random window (side scale ~U[sqrt(0.1), 1], aspect log-uniform in
    [3/4, 4/3], random offset), so no token learns to rely on an absolute position tied to one resolution.
    Eval: the embedding is resized so that it spans the input's longer side and the top-left window is
    taken, which is deterministic and works below, at and above ``max_grid``.
    """

    MIN_SCALE = math.sqrt(0.1)
    MAX_ASPECT = 4 / 3

    def __init__(self, dim: int, max_grid: int) -> None:
        super().__init__()
        self.max_grid = max_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, max_grid, max_grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def sample_windows(self, batch: int) -> tuple[Tensor, Tensor]:
        """Random (scale, offset), each ``[batch, 2]`` as (x, y) fractions of the embedding's extent."""
        dev = self.pos_embed.device
        side = torch.empty(batch, 1, device=dev).uniform_(self.MIN_SCALE, 1.0)
        log_a = math.log(self.MAX_ASPECT)
        aspect = torch.empty(batch, 1, device=dev).uniform_(-log_a, log_a).exp()
        scale = torch.cat([side * aspect, side / aspect], dim=1).clamp(max=1.0)
        offset = torch.rand(batch, 2, device=dev) * (1.0 - scale)
        return scale, offset

    def forward(self, batch: int, grid: tuple[int, int]) -> Tensor:
        """Position embedding ``[B or 1, D, h, w]`` for a ``grid`` of patch tokens."""
        h, w = grid
        if self.training:
            scale, offset = self.sample_windows(batch)
            pe = self.pos_embed.float()
            return cpe_windows(pe, grid, scale, offset).to(self.pos_embed.dtype)
        side = max(h, w)
        pe = self.pos_embed
        if side != self.max_grid:
            pe = F.interpolate(pe.float(), size=(side, side), mode="bilinear", align_corners=True).to(
                pe.dtype
            )
        return pe[:, :, :h, :w]


def window_attention_block(
    block: nn.Module, tokens: Tensor, prefix: int, grid: tuple[int, int], ws: int
) -> Tensor:
    """Run ``block`` with ViTDet windowed attention over the patch tokens of ``tokens [B, P+h*w, D]``.

    The grid is padded to a multiple of ``ws`` (padding is masked out as keys, so results do not depend on
    it); each window attends together with a copy of the ``prefix`` tokens, whose outputs are then averaged
    over windows.
    """
    b, _, d = tokens.shape
    h, w = grid
    pre, patches = tokens[:, :prefix], tokens[:, prefix:].reshape(b, h, w, d)
    ph, pw = (-h) % ws, (-w) % ws
    if ph or pw:
        patches = F.pad(patches, (0, 0, 0, pw, 0, ph))
    nh, nw = (h + ph) // ws, (w + pw) // ws
    nwin = nh * nw
    win = patches.reshape(b, nh, ws, nw, ws, d).permute(0, 1, 3, 2, 4, 5).reshape(b * nwin, ws * ws, d)
    pre_rep = pre[:, None].expand(b, nwin, prefix, d).reshape(b * nwin, prefix, d)
    mask = None
    if ph or pw:
        valid = torch.zeros(h + ph, w + pw, dtype=torch.bool, device=tokens.device)
        valid[:h, :w] = True
        valid = valid.reshape(nh, ws, nw, ws).permute(0, 2, 1, 3).reshape(nwin, ws * ws)
        keys = torch.cat([valid.new_ones(nwin, prefix), valid], dim=1)
        bias = torch.zeros(keys.shape, dtype=tokens.dtype, device=tokens.device).masked_fill(
            ~keys, float("-inf")
        )
        # [B*nwin, 1 (heads), 1 (queries), L]: broadcast by SDPA and by timm's unfused path alike.
        mask = bias[None].expand(b, -1, -1).reshape(b * nwin, 1, 1, -1)
    out = block(torch.cat([pre_rep, win], dim=1), attn_mask=mask)
    pre_out = out[:, :prefix].reshape(b, nwin, prefix, d).mean(dim=1)
    grid_out = out[:, prefix:].reshape(b, nh, nw, ws, ws, d).permute(0, 1, 3, 2, 4, 5)
    grid_out = grid_out.reshape(b, h + ph, w + pw, d)[:, :h, :w].reshape(b, h * w, d)
    return torch.cat([pre_out, grid_out], dim=1)


class CRadioBackbone(nn.Module):
    """ViT with a conv patch embed, one summary token per teacher, registers, CPE and a final norm."""

    def __init__(self, spec: StudentSpec, num_summary: int) -> None:
        super().__init__()
        dims = spec.cradio_dims()
        d, depth = int(dims["embed_dim"]), int(dims["depth"])
        self.embed_dim = d
        self.patch_size = spec.patch_size
        self.num_summary = num_summary
        self.num_registers = spec.num_registers
        self.window_size = spec.window_size
        self.patch_embed = nn.Conv2d(3, d, kernel_size=spec.patch_size, stride=spec.patch_size)
        self.summary_tokens = nn.Parameter(torch.zeros(num_summary, d))
        nn.init.trunc_normal_(self.summary_tokens, std=0.02)
        self.registers: nn.Parameter | None = None
        if spec.num_registers:
            self.registers = nn.Parameter(torch.zeros(spec.num_registers, d))
            nn.init.trunc_normal_(self.registers, std=0.02)
        self.cpe = CPE(d, spec.cpe_max_grid)
        dpr = np.linspace(0.0, float(dims["drop_path_rate"]), depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                d,
                int(dims["num_heads"]),
                mlp_ratio=float(dims["mlp_ratio"]),
                qkv_bias=bool(dims["qkv_bias"]),
                init_values=dims["init_values"],
                drop_path=dpr[i],
            )
            for i in range(depth)
        )
        # Block i attends globally when it is a k-th block (ViTDet places its global blocks the same way).
        self.is_global: list[bool] = [
            spec.window_size is None or (i + 1) % spec.global_every == 0 for i in range(depth)
        ]
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.grad_checkpointing = spec.activation_checkpointing

    @property
    def num_prefix(self) -> int:
        return self.num_summary + self.num_registers

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized images -> (summary tokens ``[B, T, D]``, patch features ``[B, h, w, D]``)."""
        b = x.shape[0]
        x = self.patch_embed(x)
        grid = (int(x.shape[2]), int(x.shape[3]))
        x = (x + self.cpe(b, grid)).flatten(2).transpose(1, 2)
        prefix: list[Tensor] = [self.summary_tokens]
        if self.registers is not None:
            prefix.append(self.registers)
        tokens = torch.cat([torch.cat(prefix, dim=0)[None].expand(b, -1, -1).to(x.dtype), x], dim=1)
        for block, is_global in zip(self.blocks, self.is_global, strict=True):
            run: Callable[[Tensor], Tensor]
            if is_global:
                run = block
            else:
                assert self.window_size is not None
                run = functools.partial(
                    window_attention_block, block, prefix=self.num_prefix, grid=grid, ws=self.window_size
                )
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(run, tokens, use_reentrant=False)
            else:
                tokens = run(tokens)
        tokens = self.norm(tokens)
        features = tokens[:, self.num_prefix :].reshape(b, grid[0], grid[1], self.embed_dim)
        return tokens[:, : self.num_summary], features


# -- timm backbone ------------------------------------------------------------------------------------------
def create_timm(spec: StudentSpec) -> nn.Module:
    """``timm.create_model`` without a classifier; ViTs get ``dynamic_img_size`` (any patch multiple)."""
    kwargs: dict[str, Any] = {"num_classes": 0, **spec.overrides}
    if spec.weights is not None:
        p = Path(spec.weights).expanduser()
        if not p.is_file():
            raise FileNotFoundError(
                f"student {spec.name}: weights file {p} does not exist — point weights at a local checkpoint "
                "or set weights to null for random init"
            )
        kwargs["pretrained_cfg_overlay"] = dict(file=str(p))
    pretrained = spec.weights is not None
    if "dynamic_img_size" not in spec.overrides:
        try:
            return timm.create_model(spec.arch, pretrained=pretrained, dynamic_img_size=True, **kwargs)
        except TypeError as err:  # a backbone without the option (CNNs) accepts any input size anyway
            if "dynamic_img_size" not in str(err):
                raise
    return timm.create_model(spec.arch, pretrained=pretrained, **kwargs)


class TimmBackbone(nn.Module):
    """A timm model as a student backbone: patch feature map plus a pooled summary input.

    The summary input is timm's own pre-logits pooling: the CLS token for ViTs with a class token, else the
    global mean of the patch features (through the head's norm for ConvNeXt). Using timm's head path keeps
    every backbone parameter in use, which distributed training needs.
    """

    def __init__(self, spec: StudentSpec) -> None:
        super().__init__()
        model: Any = create_timm(spec)  # timm's own attributes (num_features ...) are untyped
        self.model = model
        info = getattr(model, "feature_info", None)
        if not info:
            raise ValueError(f"timm arch {spec.arch!r} has no feature_info, so its output stride is unknown")
        self.patch_size = int(info[-1]["reduction"])
        self.embed_dim = int(model.num_features)
        self.summary_dim = int(getattr(model, "head_hidden_size", None) or self.embed_dim)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        if spec.activation_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(
                    f"student {spec.name}: timm arch {spec.arch!r} has no activation checkpointing"
                )
            model.set_grad_checkpointing(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized images -> (summary input ``[B, S]``, patch features ``[B, h, w, D]``)."""
        b = x.shape[0]
        gh, gw = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        out = self.model.forward_features(x)
        if out.ndim == 3:  # tokens: prefix (CLS, registers) then patches in raster order
            patches = out[:, self.num_prefix :]
            if patches.shape[1] != gh * gw:
                raise RuntimeError(
                    f"timm model gave {patches.shape[1]} patch tokens for a {gh}x{gw} grid "
                    f"(num_prefix_tokens={self.num_prefix})"
                )
            features = patches.reshape(b, gh, gw, -1)
        elif out.ndim == 4 and tuple(out.shape[2:]) == (gh, gw):  # NCHW (CNNs)
            features = out.permute(0, 2, 3, 1)
        elif out.ndim == 4 and tuple(out.shape[1:3]) == (gh, gw):  # NHWC (e.g. Swin)
            features = out
        else:
            raise RuntimeError(f"unexpected timm feature shape {tuple(out.shape)} for a {gh}x{gw} grid")
        pooled = self.model.forward_head(out, pre_logits=True)
        if pooled.ndim != 2:
            pooled = features.mean(dim=(1, 2))
        return pooled, features


# -- student ------------------------------------------------------------------------------------------------
def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A student backbone's initial weights (a state dict file; a bad file is a ``WeightsError`` naming it)."""
    return read_state_dict(path)


class StudentModel(nn.Module):
    """Backbone + one (summary, dense) adaptor head pair per teacher; teachers in sorted name order."""

    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(self, spec: StudentSpec, teachers: dict[str, TeacherHeadInfo]) -> None:
        super().__init__()
        if not teachers:
            raise ValueError(f"student {spec.name}: needs at least one teacher to predict")
        for t in teachers:
            if not _NAME.match(t):
                raise ValueError(f"teacher name {t!r} must use only letters, digits, '_' or '-'")
        self.spec = spec
        self.teacher_names: tuple[str, ...] = tuple(sorted(teachers))
        self.teachers = {t: TeacherHeadInfo.model_validate(teachers[t]) for t in self.teacher_names}
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.backbone: CRadioBackbone | TimmBackbone
        if spec.kind == "cradio":
            self.backbone = CRadioBackbone(spec, num_summary=len(self.teacher_names))
            summary_in = self.backbone.embed_dim
            if spec.weights is not None:
                self._init_cradio(spec.weights)
        else:
            self.backbone = TimmBackbone(spec)
            summary_in = self.backbone.summary_dim
        self.patch_size: int = self.backbone.patch_size
        d = self.backbone.embed_dim
        hid, nb = spec.head_hidden, spec.head_blocks
        self.summary_heads = nn.ModuleDict(
            {
                t: Mlp2(summary_in, hid, info.summary_dim, nb)
                for t, info in self.teachers.items()
                if info.summary_dim is not None
            }
        )
        self.dense_heads = nn.ModuleDict(
            {
                t: DenseHead(d, hid, info.dense_dim, nb, spec.dense_upsample)
                for t, info in self.teachers.items()
            }
        )

    def _init_cradio(self, path: str) -> None:
        """Load a backbone state dict, or the backbone part of an exported student."""
        state = load_weights_file(path)
        if any(k.startswith("backbone.") for k in state):
            state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        try:
            self.backbone.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"student {self.spec.name}: weights {path} do not fit the backbone: {err}"
            ) from None

    def forward(self, images: Tensor) -> StudentOutput:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be float [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        h, w = images.shape[2], images.shape[3]
        p = self.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(
                f"student {self.spec.name}: image size {h}x{w} must be a positive multiple of patch_size {p}"
            )
        x = (images - self.pixel_mean) / self.pixel_std
        pooled, features = self.backbone(x)
        heads: dict[str, tuple[Tensor | None, Tensor]] = {}
        for i, t in enumerate(self.teacher_names):
            summary = None
            if t in self.summary_heads:
                s_in = pooled[:, i] if pooled.ndim == 3 else pooled  # cradio: this teacher's own token
                summary = self.summary_heads[t](s_in)
            heads[t] = (summary, self.dense_heads[t](features))
        return StudentOutput(heads=heads, features=features)


def build_student(spec: StudentSpec, teachers: dict[str, TeacherHeadInfo]) -> StudentModel:
    return StudentModel(spec, teachers)


# -- export / load ------------------------------------------------------------------------------------------
def export_student(
    model: StudentModel, path: str, phis: dict[str, PhiS] | None = None, extra: dict | None = None
) -> None:
    """Write ``path/model.safetensors``, ``path/config.json`` and ``path/phis/<teacher>.safetensors``."""
    phis = phis or {}
    for t, ph in phis.items():
        if t not in model.teachers:
            raise ValueError(
                f"PHI-S given for teacher {t!r}, which student {model.spec.name} does not predict"
            )
        if ph.dim != model.teachers[t].dense_dim:
            raise ValueError(
                f"PHI-S of teacher {t!r} has dim {ph.dim} but its dense head predicts {model.teachers[t].dense_dim}"
            )
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "model.safetensors"), metadata={"format": EXPORT_FORMAT})
    if phis:
        (root / "phis").mkdir(exist_ok=True)
        for t, ph in phis.items():
            ph.save(str(root / "phis" / f"{t}.safetensors"))
    config = {
        "format": EXPORT_FORMAT,
        "spec": model.spec.model_dump(mode="json"),
        "teachers": {t: info.model_dump(mode="json") for t, info in model.teachers.items()},
        "teacher_order": list(model.teacher_names),
        "patch_size": model.patch_size,
        "phis": sorted(phis),  # only these files are read back, so stale ones in phis/ are ignored
        "extra": extra or {},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


class LoadedStudent(nn.Module):
    """An exported student ready for inference: images in, per-teacher summary and dense features out.

    Always in eval mode (``train()`` is a no-op): the CPE's random position windows are a training device.
    """

    def __init__(self, model: StudentModel, phis: dict[str, PhiS], config: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.phis = dict(phis)
        self.config = config
        self.eval()

    def train(self, mode: bool = True) -> LoadedStudent:
        return super().train(False)

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    @property
    def teacher_names(self) -> tuple[str, ...]:
        return self.model.teacher_names

    def prepare(self, images: np.ndarray | Tensor) -> Tensor:
        """uint8 ``[B, H, W, 3]`` or float ``[B, 3, H, W]`` in [0,1] -> float NCHW, sides a patch multiple."""
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if x.ndim != 4:
            raise ValueError(
                f"images must be uint8 [B, H, W, 3] or float [B, 3, H, W], got shape {tuple(x.shape)}"
            )
        if x.dtype == torch.uint8:
            if x.shape[-1] != 3:
                raise ValueError(
                    f"uint8 images must be [B, H, W, 3] (RGB, channels-last), got {tuple(x.shape)}"
                )
            x = x.permute(0, 3, 1, 2).float() / 255.0
        elif x.is_floating_point():
            if x.shape[1] != 3:
                raise ValueError(f"float images must be [B, 3, H, W] in [0, 1], got {tuple(x.shape)}")
        else:
            raise ValueError(f"images must be uint8 or float, got {x.dtype}")
        param = next(self.model.parameters())
        x = x.to(device=param.device, dtype=torch.float32)
        p = self.patch_size
        h, w = x.shape[2], x.shape[3]
        th, tw = max(p, round(h / p) * p), max(p, round(w / p) * p)
        if (th, tw) != (h, w):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
        return x

    @torch.no_grad()
    def forward(
        self, images: np.ndarray | Tensor, denormalize: bool = False
    ) -> dict[str, dict[str, Tensor | None]]:
        if denormalize:
            missing = [t for t in self.teacher_names if t not in self.phis]
            if missing:
                raise ValueError(
                    f"denormalize=True needs the PHI-S of every teacher; none saved for {missing} — "
                    "export the student with phis=... or call with denormalize=False"
                )
        out = self.model(self.prepare(images))
        result: dict[str, dict[str, Tensor | None]] = {}
        for t, (summary, dense) in out.heads.items():
            if denormalize:
                dense = self.phis[t].inverse(dense)
            result[t] = {"summary": summary, "dense": dense}
        return result


def load_student(path: str) -> LoadedStudent:
    """Rebuild an exported student (eval mode) with its PHI-S transforms; never touches weights files."""
    root = Path(path)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} does not exist — pass a folder written by export_student")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{cfg_path}: format {config.get('format')!r} is not {EXPORT_FORMAT!r}")
    # The exported state dict holds every weight: do not re-read the init checkpoint (it may be gone).
    spec = StudentSpec.model_validate({**config["spec"], "weights": None})
    teachers = {t: TeacherHeadInfo.model_validate(v) for t, v in config["teachers"].items()}
    model = StudentModel(spec, teachers)
    if list(model.teacher_names) != config["teacher_order"]:
        raise ValueError(
            f"{cfg_path}: teacher order {config['teacher_order']} != {list(model.teacher_names)}"
        )
    model.load_state_dict(read_state_dict(root / "model.safetensors"), strict=True)
    phis = {t: PhiS.load(str(root / "phis" / f"{t}.safetensors")) for t in config.get("phis", [])}
    return LoadedStudent(model, phis, config)
