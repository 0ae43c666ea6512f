"""What FeatSharp trains and is judged on: photos held out by whole photo, and the teacher's views of them.

``make_views`` runs the frozen teacher once, batched, over the low-res view, the u x u tiles of the u-times
larger image, and the jittered views whose low-res outputs FeatSharp's map must reproduce (PHI-S space).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from radio_dist.config import ConfigError
from radio_dist.featsharp.model import assemble_tiles, identity_jitters, jitter_views, split_tiles
from radio_dist.phis import Moments, PhiS, fit_phis
from radio_dist.sources import ImageError, SourceConfig, SourceItem, canonical_view, decode_image, read_bytes
from radio_dist.teacher import Teacher


def split_held_out(items: list[SourceItem], held_out: int) -> tuple[list[SourceItem], list[SourceItem]]:
    """(train, held-out): the held-out set is every view of ``held_out`` whole photos, chosen by a hash of
    their uri (stable across runs and machines), so no view of a held-out photo is ever trained on."""
    photos = sorted({it.photo for it in items}, key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    if len(photos) <= held_out:
        raise ConfigError(
            f"featsharp: the source has {len(photos)} photo(s); holding out {held_out} leaves none to train on — "
            "add photos or lower held_out"
        )
    out = set(photos[:held_out])
    return [it for it in items if it.photo not in out], [it for it in items if it.photo in out]


def load_views(items: list[SourceItem], size: int, source: SourceConfig) -> tuple[np.ndarray, list[str]]:
    """Decode items into uint8 ``[N, size, size, 3]`` canonical views; bad inputs are skipped and named."""
    views, bad = [], []
    for it in items:
        try:
            data = read_bytes(it.uri, source.storage_options)
            img = decode_image(data, it.uri, source.min_side, source.max_pixels)
            views.append(canonical_view(img.image, size, it.view, source.resample)[0])
        except (ImageError, OSError, ValueError) as e:
            bad.append(f"{it.uri}: {e}")
    if not views:
        raise ConfigError(f"featsharp: no decodable image in the source ({len(bad)} bad, e.g. {bad[:1]})")
    return np.stack(views), bad


def teacher_dense(teacher: Teacher, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Dense features of normalized inputs, ``runtime.batch_size`` at a time."""
    outs = [teacher.features(x[i : i + chunk]).dense for i in range(0, x.shape[0], chunk)]
    return torch.cat(outs)


@dataclass
class Views:
    low: torch.Tensor  # [B, g, g, C] PHI-S space, the un-jittered low-res view
    tiles: torch.Tensor  # [B, u*g, u*g, C] PHI-S space
    targets: torch.Tensor  # [B, J, g, g, C] PHI-S space: teacher outputs of the jittered views
    theta: torch.Tensor  # [B, J, 2, 3]


def make_views(
    teacher: Teacher, phis: PhiS, x: torch.Tensor, factor: int, low_px: int, theta: torch.Tensor
) -> Views:
    """One batched teacher pass over the low view, the u x u tiles and the jittered views of ``x``."""
    b = x.shape[0]
    low_in = F.interpolate(x, size=(low_px, low_px), mode="bilinear", align_corners=False, antialias=True)
    parts = [low_in, split_tiles(x, factor), jitter_views(x, theta, low_px)]
    dense = phis.forward(teacher_dense(teacher, torch.cat(parts), teacher.spec.runtime.batch_size))
    assert isinstance(dense, torch.Tensor)
    g = dense.shape[1]
    low, rest = dense[:b], dense[b:]
    tiles = assemble_tiles(rest[: b * factor * factor], factor)
    targets = rest[b * factor * factor :].reshape(b, theta.shape[1], g, g, -1)
    return Views(low, tiles, targets, theta)


def with_identity(theta: torch.Tensor, views: Views) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepend the un-jittered view (target: the low-res output itself) to the jitters."""
    b = theta.shape[0]
    return (
        torch.cat([identity_jitters(b, 1).to(theta), theta], dim=1),
        torch.cat([views.low[:, None], views.targets], dim=1),
    )


def fit_teacher_phis(teacher: Teacher, images: np.ndarray, low_px: int, seed: int = 0) -> PhiS:
    """PHI-S of the teacher's low-res dense features over ``images`` (the same on every worker)."""
    m: Moments | None = None
    chunk = teacher.spec.runtime.batch_size
    for i in range(0, len(images), chunk):
        dense = teacher(images[i : i + chunk], resolution=low_px).dense
        part = Moments.from_features(dense)
        m = part if m is None else m.merge(part)
    assert m is not None
    return fit_phis(m, seed=seed)
