"""Fidelity of trained students to their teachers on held-out images, at several resolutions.

For each held-out image (a source's images whose ids are not in the store), each teacher recorded in the
store is run live on the image's canonical view of a partition — the same view and resolution its cached
targets come from. Each student sees that view resized to every evaluation resolution; its dense output,
mapped back to teacher space with the store's PHI-S, is resampled to the teacher's grid and compared token by
token (cosine), its summary by cosine. An untrained student of the same spec is scored alongside as the
floor. A student that only works at the resolution it saw most (mode switching) shows up as a collapse of
fidelity at the other resolutions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from radio_dist.config import StrictModel
from radio_dist.sources import SourceConfig, canonical_view, decode_image, image_id, list_items, read_bytes
from radio_dist.store import FeatureStore, StoreError
from radio_dist.students import LoadedStudent, StudentModel, TeacherHeadInfo, build_student, load_student
from radio_dist.teacher import TeacherSpec, create_teacher


class EvalConfig(StrictModel):
    source: SourceConfig = Field(
        default_factory=lambda: SourceConfig(views=96),
        description="Where held-out images come from; images already in the store are skipped.",
    )
    images: int = Field(16, ge=1, description="Held-out images to evaluate on.")
    resolutions: list[int] | None = Field(
        None, description="Student input resolutions (px); default: 0.5x, 1x, 1.5x of each partition."
    )
    batch_size: int = Field(8, ge=1, description="Images per forward.")


def held_out_images(store: FeatureStore, source: SourceConfig, n: int) -> list[tuple[str, np.ndarray, str]]:
    """Up to ``n`` decoded (id, rgb, view) from the source whose ids the store does not hold."""
    known = store.committed_ids()
    out = []
    for item in list_items(source):
        data = read_bytes(item.uri, source.storage_options)
        iid = image_id(data, item.view)
        if iid in known:
            continue
        try:
            img = decode_image(data, item.uri, source.min_side, source.max_pixels)
        except ValueError:
            continue
        out.append((iid, img.rgb, item.view))
        if len(out) >= n:
            break
    if not out:
        raise StoreError(
            f"no held-out images: every image of the source is already in {store.url} — "
            "evaluate on another source (e.g. more sample-photo views)"
        )
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def _to_grid(dense: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(dense.shape[1:3]) == hw:
        return dense
    x = dense.permute(0, 3, 1, 2)
    antialias = x.shape[-2] > hw[0] or x.shape[-1] > hw[1]
    y = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=antialias)
    return y.permute(0, 2, 3, 1)


def _nearest_partition(partitions: dict[str, int], resolution: int) -> str:
    return min(sorted(partitions), key=lambda p: abs(partitions[p] - resolution))


def untrained_like(student: LoadedStudent, seed: int = 0) -> LoadedStudent:
    """The floor: a randomly initialised student of the same spec and heads."""
    cfg = student.config
    torch.manual_seed(seed)
    model: StudentModel = build_student(
        type(student.model.spec).model_validate(cfg["spec"]),
        {t: TeacherHeadInfo(**h) for t, h in cfg["teachers"].items()},
    )
    return LoadedStudent(model, student.phis, cfg)


def evaluate(
    store: FeatureStore,
    students: dict[str, LoadedStudent],
    cfg: EvalConfig,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """{"students": {name: {teacher: {res: {"dense_cos", "summary_cos"}}}}, "untrained": ..., ...}."""
    meta = store.meta()
    partitions = {p: int(px) for p, px in meta["partitions"].items()}
    resolutions = cfg.resolutions or sorted(
        {max(32, int(round(px * f / 32)) * 32) for px in partitions.values() for f in (0.5, 1.0, 1.5)}
    )
    # each resolution is scored against the partition whose cached size is closest to it
    part_of = {r: _nearest_partition(partitions, r) for r in resolutions}
    images = held_out_images(store, cfg.source, cfg.images)
    teachers_used = sorted({t for s in students.values() for t in s.teacher_names})
    models = {**{name: s for name, s in students.items()}}
    floors = {name: untrained_like(s) for name, s in students.items()}
    sums: dict[tuple[str, str, str, int, str], list[float]] = {}
    for p, px in sorted(partitions.items()):
        if p not in part_of.values():
            continue
        views = np.stack([canonical_view(rgb, px, view)[0] for _, rgb, view in images])
        for t in teachers_used:
            if progress:
                progress(f"teacher {t} at {p}={px}px on {len(views)} held-out images")
            spec = TeacherSpec.model_validate(meta["teachers"][t]["spec"])
            teacher = create_teacher(spec)
            for i in range(0, len(views), cfg.batch_size):
                chunk = views[i : i + cfg.batch_size]
                ref = teacher(chunk)
                x = torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div_(255.0)
                for r in [r for r in resolutions if part_of[r] == p]:
                    xr = (
                        x
                        if r == px
                        else F.interpolate(
                            x, size=(r, r), mode="bilinear", align_corners=False, antialias=True
                        )
                    )
                    for kind, group in (("trained", models), ("untrained", floors)):
                        for name, st in group.items():
                            if t not in st.teacher_names:
                                continue
                            out = st(xr, denormalize=True)[t]
                            dense = _to_grid(out["dense"], tuple(ref.dense.shape[1:3]))  # type: ignore[union-attr,arg-type]
                            key = (kind, name, t, r)
                            sums.setdefault((*key, "dense_cos"), []).extend(
                                _cos(dense, ref.dense).mean(dim=(1, 2)).tolist()
                            )
                            if out["summary"] is not None and ref.summary is not None:
                                sums.setdefault((*key, "summary_cos"), []).extend(
                                    _cos(out["summary"], ref.summary).tolist()
                                )
            del teacher
    result: dict[str, Any] = {
        "images": len(images),
        "resolutions": resolutions,
        "reference_partition": part_of,
        "students": {},
        "untrained": {},
    }
    for (kind, name, t, r, metric), vals in sorted(sums.items()):
        bucket = result["students" if kind == "trained" else "untrained"]
        bucket.setdefault(name, {}).setdefault(t, {}).setdefault(str(r), {})[metric] = float(np.mean(vals))
    return result


def load_students(paths: Sequence[str]) -> dict[str, LoadedStudent]:
    out = {}
    for path in paths:
        s = load_student(path)
        out[s.model.spec.name] = s
    return out
