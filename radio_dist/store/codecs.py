"""Target codecs: how a teacher's dense targets (PHI-S space) are stored, and how they become floats again.

PHI-S gives every target dimension unit variance, which suits quantization. Three codecs, chosen per teacher
and partition (``codecs`` in the caching job's config, recorded in ``store.json``):

- ``fp16``: the float16 values (2 bytes a value).
- ``int8``: one absmax scale per token (float16), codes ``round(x / scale)`` in [-127, 127]; 1 byte a value.
- ``nf4`` (``nf4-gG``, G channels per group, default 64): the 16 NormalFloat levels (quantiles of a normal
  distribution, exact 0 and +-1) with one absmax scale per group of G channels (float16), two codes a byte;
  4 + 16/G bits a value. On this project's own PHI-S targets (kurtosis ~5) it beat int4 absmax per group of
  32, a Lloyd-Max codebook with a per-token RMS scale and a Lloyd-Max codebook fitted to the data, at fewer
  bits (docs/store.md: "Target codecs").

A shard holds ``T/P/dense`` (the codes) and, for the quantized codecs, ``T/P/dense_scale``. Readers hand codes
and scales to the training device as stored; ``decode`` (torch, on any device) makes the float targets there.
``Fidelity`` accumulates, when targets are written, how close the decoded targets are to the floats they were
encoded from (relative MSE, mean and 1st-percentile cosine per token); the sums merge across batches and shards.
"""

from __future__ import annotations

import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

_CODECS: dict[str, Callable[[str], TargetCodec]] = {}
FP16_MAX = 65000.0  # stored values are clamped just inside float16's range (65504)


def register_codec(family: str) -> Callable[[Callable[[str], TargetCodec]], Callable[[str], TargetCodec]]:
    """Register a codec family under ``family`` (its names are ``family`` or ``family-<options>``)."""

    def deco(factory: Callable[[str], TargetCodec]) -> Callable[[str], TargetCodec]:
        if family in _CODECS:
            raise ValueError(f"codec family {family!r} is registered twice")
        _CODECS[family] = factory
        return factory

    return deco


class UnknownCodecError(ValueError):
    """A codec name this version does not know (in a config, or recorded in a store)."""


def known_codecs() -> list[str]:
    return ["fp16", "int8", "nf4", "nf4-g32", "nf4-g128"]


def get_codec(name: str) -> TargetCodec:
    """The codec called ``name`` (``fp16``, ``int8``, ``nf4``, ``nf4-g32`` ...); an unknown name raises."""
    family = str(name).split("-", 1)[0]
    if family not in _CODECS:
        raise UnknownCodecError(
            f"unknown target codec {name!r} (this version knows {', '.join(known_codecs())}"
            f"{'' if family == name else '; nf4 takes -gG with G a power of two'})"
        )
    return _CODECS[family](str(name))


class TargetCodec(ABC):
    """Encodes float targets ``[..., C]`` into codes (+ scales) and decodes them back."""

    name: str

    @property
    def has_scale(self) -> bool:
        return True

    @abstractmethod
    def code_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Stored row shape of the codes for targets of row shape ``shape`` (``[h, w, C]``)."""

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Stored row shape of the scales (None: this codec has none)."""
        return None

    @property
    @abstractmethod
    def code_dtype(self) -> np.dtype:
        """dtype of the stored codes."""

    def check_dim(self, dim: int, what: str) -> None:  # noqa: B027 (most codecs store any channel count)
        """Refuse a channel count this codec cannot store (``what`` names the teacher and partition)."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float targets ``[..., C]`` -> (codes, scales or None), on x's device."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """(codes, scales) -> float targets ``[..., C]`` (float16 for fp16, float32 otherwise), on codes' device."""

    def bytes_per_token(self, dim: int) -> float:
        """Stored bytes per token of ``dim`` channels (codes + scales)."""
        code = int(np.prod(self.code_shape((1, 1, dim)))) * self.code_dtype.itemsize
        sshape = self.scale_shape((1, 1, dim))
        return code + (int(np.prod(sshape)) * 2 if sshape is not None else 0)

    def decode_numpy(self, codes: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
        """float32 targets from stored numpy arrays (reading for humans, verify, recode)."""
        out = self.decode(torch.from_numpy(np.ascontiguousarray(codes)), _tensor(scale))
        return out.float().numpy()

    def check_codes(self, codes: np.ndarray, scale: np.ndarray | None) -> str | None:
        """What is wrong with stored codes and scales, or None (``store verify``)."""
        if scale is not None and not np.all(np.isfinite(scale.astype(np.float32))):
            return "scales that are not finite"
        if scale is not None and np.any(scale.astype(np.float32) < 0):
            return "negative scales"
        return None


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


@dataclass(frozen=True)
class Fp16Codec(TargetCodec):
    name: str = "fp16"

    @property
    def has_scale(self) -> bool:
        return False

    def code_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.float16)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x.float().clamp(-FP16_MAX, FP16_MAX).half(), None

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        return codes  # used as float16; the losses convert it on the device

    def check_codes(self, codes: np.ndarray, scale: np.ndarray | None) -> str | None:
        if not np.all(np.isfinite(codes)):
            return "values that are not finite"
        return None


def _fp16_scale(absmax: torch.Tensor, levels: float) -> torch.Tensor:
    """A float16 scale per slice; the encoder divides by the float16 value the decoder will multiply by."""
    scale = (absmax / levels).clamp(max=FP16_MAX).half()
    return torch.where(scale.float() > 0, scale, torch.ones_like(scale))


@dataclass(frozen=True)
class Int8Codec(TargetCodec):
    name: str = "int8"

    def code_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        return tuple(shape[:-1])

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.int8)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.float()
        scale = _fp16_scale(x.abs().amax(dim=-1), 127.0)
        codes = torch.round(x / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
        return codes, scale

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        assert scale is not None
        return codes.float() * scale.float()[..., None]

    def check_codes(self, codes: np.ndarray, scale: np.ndarray | None) -> str | None:
        if np.any(codes == -128):
            return "the code -128, which the int8 codec never writes"
        return super().check_codes(codes, scale)


# NormalFloat-4 levels (QLoRA): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclass(frozen=True)
class Nf4Codec(TargetCodec):
    name: str = "nf4"
    group: int = 64

    def code_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], shape[-1] // 2)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        return (*shape[:-1], shape[-1] // self.group)

    @property
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def check_dim(self, dim: int, what: str) -> None:
        if dim % self.group:
            fits = [g for g in (128, 64, 32, 16, 8) if dim % g == 0]
            hint = f"nf4-g{fits[0]}" if fits else "int8"
            raise UnknownCodecError(
                f"{what}: codec {self.name} stores groups of {self.group} channels, the teacher has {dim} — "
                f"choose {hint}"
            )

    def _levels(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.float()
        *lead, c = x.shape
        g = x.reshape(*lead, c // self.group, self.group)
        scale = _fp16_scale(g.abs().amax(dim=-1), 1.0)
        y = g / scale.float()[..., None]
        levels = self._levels(x.device)
        idx = torch.bucketize(y, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).reshape(*lead, c)
        codes = idx[..., 0::2] | (idx[..., 1::2] << 4)
        return codes, scale

    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        assert scale is not None
        *lead, half = codes.shape
        idx = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(*lead, 2 * half).long()
        vals = self._levels(codes.device)[idx].reshape(*lead, -1, self.group)
        return (vals * scale.float()[..., None]).reshape(*lead, 2 * half)


@register_codec("nf4")
def _nf4(name: str) -> TargetCodec:
    m = re.fullmatch(r"nf4(?:-g(\d+))?", name)
    group = int(m.group(1)) if m and m.group(1) else 64
    if m is None or group < 2 or group & (group - 1):
        raise UnknownCodecError(
            f"unknown target codec {name!r}: nf4 takes -gG with G a power of two (nf4-g32)"
        )
    return Nf4Codec(name=name if m.group(1) else "nf4", group=group)


def _exact(name: str, codec: TargetCodec) -> TargetCodec:
    if name != codec.name:
        raise UnknownCodecError(
            f"unknown target codec {name!r} (this version knows {', '.join(known_codecs())})"
        )
    return codec


register_codec("fp16")(lambda name: _exact(name, Fp16Codec()))
register_codec("int8")(lambda name: _exact(name, Int8Codec()))


# -- fidelity --------------------------------------------------------------------------------------------------
# Per-token cosines are histogrammed on d = -log10(1 - cos), bins of 0.01 from 0 (cos <= 0) to 8 (cos >= 1-1e-8):
# the 1st percentile is read back to ~2% of (1 - cos), and the sums merge exactly across batches and shards.
BIN = 0.01
NBINS = 800


@dataclass
class Fidelity:
    """Mergeable closeness of decoded targets to the floats they were encoded from."""

    tokens: int = 0
    sq_err: float = 0.0  # sum over values of (decoded - reference)^2
    sq_ref: float = 0.0  # sum over values of reference^2
    cos_sum: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(NBINS, np.int64))

    @classmethod
    def measure(cls, ref: torch.Tensor, decoded: torch.Tensor) -> Fidelity:
        """Fidelity of ``decoded`` against ``ref`` (both ``[..., C]``), computed on their device."""
        return cls.from_vector(
            cls.per_image(ref.reshape(1, -1, ref.shape[-1]), decoded.reshape(1, -1, ref.shape[-1]))[0]
        )

    @staticmethod
    def per_image(ref: torch.Tensor, decoded: torch.Tensor) -> np.ndarray:
        """One ``to_vector()`` per image of ``[n, ..., C]`` batches, computed batched on their device (one
        bincount for the whole batch, not a loop over images)."""
        n, c = ref.shape[0], ref.shape[-1]
        r = ref.detach().reshape(n, -1, c).double()
        d = decoded.detach().reshape(n, -1, c).double()
        dot = (r * d).sum(-1)
        nr, nd = r.norm(dim=-1), d.norm(dim=-1)
        both_zero = (nr == 0) & (nd == 0)
        cos = torch.where(both_zero, torch.ones_like(dot), dot / (nr * nd).clamp_min(1e-300)).clamp(-1, 1)
        dist = -torch.log10((1 - cos).clamp_min(1e-12))
        bins = (dist / BIN).floor().clamp(0, NBINS - 1).long()
        offset = torch.arange(n, device=bins.device)[:, None] * NBINS
        hist = torch.bincount((bins + offset).reshape(-1), minlength=n * NBINS).reshape(n, NBINS)
        sums = torch.stack(
            [
                torch.full((n,), float(r.shape[1]), dtype=torch.float64, device=r.device),
                ((d - r) ** 2).sum(dim=(1, 2)),
                (r**2).sum(dim=(1, 2)),
                cos.sum(-1),
            ],
            dim=1,
        )
        return torch.cat([sums, hist.double()], dim=1).cpu().numpy()

    def merge(self, other: Fidelity) -> Fidelity:
        return Fidelity(
            self.tokens + other.tokens,
            self.sq_err + other.sq_err,
            self.sq_ref + other.sq_ref,
            self.cos_sum + other.cos_sum,
            self.hist + other.hist,
        )

    # a fixed-length float64 vector: one per row in the caching pipeline (Ray Data columns have fixed shapes)
    def to_vector(self) -> np.ndarray:
        return np.concatenate([[self.tokens, self.sq_err, self.sq_ref, self.cos_sum], self.hist]).astype(
            np.float64
        )

    @classmethod
    def from_vector(cls, v: np.ndarray) -> Fidelity:
        v = np.asarray(v, np.float64)
        return cls(int(v[0]), float(v[1]), float(v[2]), float(v[3]), np.rint(v[4:]).astype(np.int64))

    def to_json(self) -> dict[str, Any]:
        nz = np.flatnonzero(self.hist)
        return {
            "tokens": self.tokens,
            "sq_err": self.sq_err,
            "sq_ref": self.sq_ref,
            "cos_sum": self.cos_sum,
            "hist": {str(int(i)): int(self.hist[i]) for i in nz},
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Fidelity:
        hist = np.zeros(NBINS, np.int64)
        for k, v in (d.get("hist") or {}).items():
            hist[int(k)] = int(v)
        return cls(int(d["tokens"]), float(d["sq_err"]), float(d["sq_ref"]), float(d["cos_sum"]), hist)

    @property
    def rel_mse(self) -> float:
        return self.sq_err / self.sq_ref if self.sq_ref > 0 else 0.0

    @property
    def cos_mean(self) -> float:
        return self.cos_sum / self.tokens if self.tokens else float("nan")

    def cos_quantile(self, q: float) -> float:
        """The cosine below which a fraction ``q`` of tokens lie (the lower edge of the bin that holds it)."""
        if not self.tokens:
            return float("nan")
        cum = np.cumsum(self.hist)  # bin 0 holds the worst tokens
        i = int(np.searchsorted(cum, q * self.tokens, side="left"))
        return 1.0 - 10.0 ** (-(min(i, NBINS - 1) * BIN)) if i > 0 else 0.0

    def summary(self) -> dict[str, float | int]:
        return {
            "tokens": self.tokens,
            "rel_mse": self.rel_mse,
            "cos_mean": self.cos_mean,
            "cos_p1": self.cos_quantile(0.01),
        }


def fidelity_key(teacher: str, partition: str) -> str:
    return f"{teacher}/{partition}"


def dump_fidelity(stats: dict[str, tuple[str, str, Fidelity]]) -> bytes:
    """``{teacher/partition: (codec, measured against, Fidelity)}`` as the JSON a manifest part carries."""
    return json.dumps(
        {k: {"codec": c, "against": a, **f.to_json()} for k, (c, a, f) in sorted(stats.items())},
        sort_keys=True,
    ).encode()


def load_fidelity(blob: bytes | None) -> dict[str, tuple[str, str, Fidelity]]:
    if not blob:
        return {}
    return {k: (d["codec"], d["against"], Fidelity.from_json(d)) for k, d in json.loads(blob).items()}


def merge_fidelity(blobs: list[bytes]) -> dict[str, tuple[str, str, Fidelity]]:
    """The fidelity of many commits (their metadata ``blobs``) as one: per ``teacher/partition``, summed over
    the commits measured with the same (codec, against); a later (codec, against) replaces an earlier one."""
    merged: dict[str, tuple[str, str, Fidelity]] = {}
    for blob in blobs:
        for key, (codec, against, fid) in load_fidelity(blob).items():
            if key in merged and merged[key][:2] == (codec, against):
                fid = merged[key][2].merge(fid)
            merged[key] = (codec, against, fid)
    return merged


def expected_cosine(rel_mse: float) -> float:
    """The cosine a relative MSE implies for errors independent of the targets: 1/sqrt(1 + relMSE)."""
    return 1.0 / math.sqrt(1.0 + rel_mse)
