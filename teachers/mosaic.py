"""Mosaic: pack k x k small views into one native-size teacher input and cut the output grid back.

A teacher that only runs well at one native size (SAM3: 1008 px, 72x72 tokens) can still serve a
low-resolution partition: k*k views of ``native / k`` px are tiled into one native input, the teacher runs
once, and its ``k*g x k*g`` output grid is cut back into k*k per-image ``g x g`` grids. N views cost
``ceil(N / k**2)`` teacher forwards instead of N.

Pure functions of arrays (torch tensors or numpy arrays, channels last); no teacher knows about them but
the ones that use them. Tiles are laid out row-major: image ``i`` of a mosaic sits at row ``i // k``,
column ``i % k``. The last mosaic is padded with zeros (after pixel normalization: the mean colour).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


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
