"""FeatSharp's held-out report: how well its map predicts the teacher's own outputs of jittered views, next to
bilinear upsampling of the low-res map (``radio-dist featsharp eval``; ``OUT/report.json`` of training)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from radio_dist.config import ConfigError
from radio_dist.featsharp.file import LoadedFeatSharp, load_featsharp
from radio_dist.featsharp.model import bilinear_prediction, masked_mse, sample_jitters
from radio_dist.featsharp.views import load_views, make_views
from radio_dist.sources import SourceConfig, list_items
from radio_dist.teacher import Teacher, TeacherSpec, create_teacher


@torch.no_grad()
def consistency_report(
    teacher: Teacher,
    fs: LoadedFeatSharp,
    images: np.ndarray,
    jitters: int,
    seed: int,
    zoom: tuple[float, float] = (0.95, 1.05),
    max_rotation_deg: float = 5.0,
    max_shift: float = 0.05,
) -> dict[str, Any]:
    """On ``images`` (uint8, high-res): how well the teacher's low-res outputs of jittered views are
    reconstructed by FeatSharp's map vs by bilinear upsampling of the low-res map (PHI-S space, cells inside
    the image after the warp). Lower MSE / higher cosine is better; the jitters are fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    sums = {"featsharp_mse": 0.0, "bilinear_mse": 0.0, "featsharp_cos": 0.0, "bilinear_cos": 0.0}
    n = 0
    for i in range(len(images)):
        x = teacher.normalize(images[i : i + 1])
        theta = sample_jitters(jitters, gen, zoom, max_rotation_deg, max_shift).view(1, jitters, 2, 3).to(x)
        v = make_views(teacher, fs.phis, x, fs.factor, fs.low_px, theta)
        hr = fs.model(x, v.low, v.tiles)
        pred, valid = fs.model.predict_lowres(hr, theta)
        base = bilinear_prediction(v.low, theta)
        for name, p in (("featsharp", pred), ("bilinear", base)):
            sums[f"{name}_mse"] += float(masked_mse(p, v.targets, valid))
            cos = F.cosine_similarity(p.double(), v.targets.double(), dim=-1)
            sums[f"{name}_cos"] += float(cos[valid].mean())
        n += 1
    res: dict[str, Any] = {k: s / max(1, n) for k, s in sums.items()}
    res.update(images=n, jitters=jitters, seed=seed)
    res["featsharp_beats_bilinear"] = bool(res["featsharp_mse"] < res["bilinear_mse"])
    return res


def evaluate_file(
    path: str,
    source: SourceConfig | None = None,
    images: int = 16,
    jitters: int = 8,
    seed: int = 1,
    held_out_only: bool = True,
) -> dict[str, Any]:
    """``radio-dist featsharp eval``: the consistency report of a FeatSharp file on views of the photos it
    held out of training (``held_out_only``), from ``source`` (default: the sample photos, 96 views)."""
    fs = load_featsharp(path)
    spec = TeacherSpec.model_validate(fs.meta["teacher"])
    source = source or SourceConfig(views=96)
    items = list_items(source)
    if held_out_only:
        held = set(fs.meta.get("held_out_photos") or [])
        items = [it for it in items if it.photo in held]
        if not items:
            raise ConfigError(
                f"{path} held out {sorted(held)}, none of which is in this source; pass the training source, "
                "or evaluate on any photos (held_out_only=False / --any-photos)"
            )
    imgs, _ = load_views(items[:images], fs.low_px * fs.factor, source)
    teacher = create_teacher(spec)
    res = consistency_report(teacher, fs, imgs, jitters, seed)
    res.update(teacher=spec.name, low=fs.low_px, high=fs.low_px * fs.factor, steps=fs.meta.get("steps"))
    return res
