"""Mosaic: pack k x k small views into one native-size teacher input and cut the output grid back.

A teacher that only runs well at one native size (SAM3: 1008 px, 72x72 tokens) can still serve a
low-resolution partition: k*k views of ``native / k`` px are tiled into one native input, the teacher runs
once, and its ``k*g x k*g`` output grid is cut back into k*k per-image ``g x g`` grids. N views cost
``ceil(N / k**2)`` teacher forwards instead of N.

The adaptation ``mosaic`` is registered here: a spec with ``adaptation: mosaic`` sets ``options.mosaic_k``
(k, views per side) and a ``runtime.batch_size`` that fills whole mosaics; a family that implements it
(SAM3: ``teachers.sam3``) declares so when it registers. ``tile`` / ``untile`` are pure functions of arrays
(torch tensors or numpy arrays, channels last). Tiles are laid out row-major: image ``i`` of a mosaic sits
at row ``i // k``, column ``i % k``. The last mosaic is padded with zeros (after pixel normalization: the
mean colour).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from radio_dist.teacher import TeacherSpec, register_adaptation

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)

MOSAIC = "mosaic"
MOSAIC_K = "mosaic_k"  # the spec option holding the mosaic's views per side


def check_mosaic_spec(spec: TeacherSpec) -> None:
    """``adaptation: mosaic`` needs an integer ``options.mosaic_k`` >= 2 and batches of whole mosaics."""
    k = spec.options.get(MOSAIC_K)
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ValueError(
            f"teacher {spec.name!r}: adaptation=mosaic needs options.{MOSAIC_K}, an integer >= 2 "
            f"(views per side of one native input, e.g. 3 for 336 px views in SAM3's 1008 px); got {k!r}"
        )
    if spec.runtime.batch_size % (k * k):
        raise ValueError(
            f"teacher {spec.name!r}: runtime.batch_size={spec.runtime.batch_size} is not a multiple of "
            f"{MOSAIC_K}**2 = {k * k}; set it to one (e.g. {k * k * max(1, spec.runtime.batch_size // (k * k))}) "
            "so every batch fills whole mosaics"
        )


def mosaic_k(spec: TeacherSpec) -> int | None:
    """Views per mosaic side of a spec with ``adaptation: mosaic``, else None."""
    return int(spec.options[MOSAIC_K]) if spec.adaptation == MOSAIC else None


register_adaptation(
    MOSAIC,
    description="k x k low-partition views tiled into one native input, run once, output grid cut back "
    f"(options.{MOSAIC_K} = k); implemented by the families that declare it (sam3)",
    options=(MOSAIC_K,),
    check=check_mosaic_spec,
)


def mosaic_count(n: int, k: int) -> int:
    """Mosaics (= teacher forwards) needed for ``n`` views: ``ceil(n / k**2)``."""
    _check_k(k)
    return -(-n // (k * k))


def tile(images: ArrayT, k: int) -> tuple[ArrayT, int]:
    """``[N, H, W, C]`` views -> (``[ceil(N/k^2), k*H, k*W, C]`` mosaics, N). The last mosaic is zero-padded."""
    _check_k(k)
    if images.ndim != 4:
        raise ValueError(f"tile expects [N, H, W, C] views, got shape {tuple(images.shape)}")
    n, h, w, c = images.shape
    m = mosaic_count(n, k)
    pad = m * k * k - n
    if isinstance(images, torch.Tensor):
        if pad:
            images = torch.cat([images, images.new_zeros((pad, h, w, c))])
        out = images.reshape(m, k, k, h, w, c).permute(0, 1, 3, 2, 4, 5).reshape(m, k * h, k * w, c)
    else:
        if pad:
            images = np.concatenate([images, np.zeros((pad, h, w, c), images.dtype)])
        out = images.reshape(m, k, k, h, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(m, k * h, k * w, c)
    return out, n


def untile(dense: ArrayT, k: int, n: int) -> ArrayT:
    """``[M, k*g, k*g, C]`` mosaic outputs -> ``[n, g, g, C]`` per-image grids (padding tiles dropped)."""
    _check_k(k)
    if dense.ndim != 4:
        raise ValueError(f"untile expects [M, k*g, k*g, C] grids, got shape {tuple(dense.shape)}")
    m, gh, gw, c = dense.shape
    if gh % k or gw % k:
        raise ValueError(f"untile: a {gh}x{gw} grid does not split into {k}x{k} equal tiles")
    if not 0 <= n <= m * k * k:
        raise ValueError(f"untile: {m} mosaic(s) of {k}x{k} hold at most {m * k * k} images, asked for {n}")
    h, w = gh // k, gw // k
    if isinstance(dense, torch.Tensor):
        out = dense.reshape(m, k, h, k, w, c).permute(0, 1, 3, 2, 4, 5).reshape(m * k * k, h, w, c)
    else:
        out = dense.reshape(m, k, h, k, w, c).transpose(0, 1, 3, 2, 4, 5).reshape(m * k * k, h, w, c)
    return out[:n]


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"mosaic k must be a positive integer (views per mosaic side), got {k!r}")
