"""Fidelity of trained students to their teachers on held-out images, at several resolutions.

For each held-out image (a source's images whose ids are not in the store), each teacher recorded in the
store is run live on the image's canonical view of a partition — the same view and resolution its cached
targets come from. Each student sees that view resized to every evaluation resolution; its dense output,
mapped back to teacher space with the store's PHI-S, is resampled to the teacher's grid and compared token by
token (cosine, in PHI-S space and in teacher space), its summary by cosine. Two floors are scored alongside:
an untrained student of the same spec, and the "mean predictor" (the store's average targets) — beating
the latter is what shows a student learned something about each image. A student that only works at the resolution it saw most (mode switching) shows up as a collapse of
fidelity at the other resolutions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field

from radio_dist.config import StrictModel
from radio_dist.sources import (
    SamplePhotos,
    SourceConfig,
    canonical_view,
    decode_image,
    image_id,
    list_items,
    photo_of,
    read_bytes,
)
from radio_dist.store import FeatureStore, StoreError
from radio_dist.teacher import create_teacher, spec_from_record
from radio_dist.train.reader import committed_shards
from radio_dist.train.students import (
    LoadedStudent,
    StudentModel,
    TeacherHeadInfo,
    build_student,
    load_student,
)


class EvalConfig(StrictModel):
    source: SourceConfig = Field(
        default_factory=lambda: SourceConfig(photos=SamplePhotos.eval, views=16),
        description="Where held-out images come from (default: views of the sample photos every default store "
        "keeps out); an image the store holds, or any view of a photo it trained on, is refused.",
    )
    images: int = Field(16, ge=1, description="Held-out images to evaluate on.")
    resolutions: list[int] | None = Field(
        None, description="Student input resolutions (px); default: 0.5x, 1x, 1.5x of each partition."
    )
    batch_size: int = Field(8, ge=1, description="Images per forward.")
    pictures: int = Field(
        0,
        ge=0,
        description="Held-out photos whose teacher features and student predictions are kept (pictures).",
    )


@dataclass
class HeldOut:
    images: list[tuple[str, Image.Image, str]]  # (id, RGB image, view)
    refused: int  # items of the source the store trained on (its ids, or views of its photos)
    undecodable: int


def held_out_images(store: FeatureStore, source: SourceConfig, n: int) -> HeldOut:
    """Up to ``n`` decoded images of the source that the store did not train on: an item is refused when its
    content id is in the store or when it is a view of a photo (source uri) any stored row came from."""
    table = store.manifest(columns=["id", "source"])
    known = set(table.column("id").to_pylist())
    trained = {photo_of(str(u)) for u in table.column("source").to_pylist() if u}
    out, refused, bad = [], 0, 0
    for item in list_items(source):
        if item.photo in trained:
            refused += 1
            continue
        data = read_bytes(item.uri, source.storage_options)
        iid = image_id(data, item.view)
        if iid in known:
            refused += 1
            continue
        try:
            img = decode_image(data, item.uri, source.min_side, source.max_pixels)
        except ValueError:
            bad += 1
            continue
        out.append((iid, img.image, item.view))
        if len(out) >= n:
            break
    if not out:
        what = source.path or f"the sample photos ({source.photos.value})"
        raise StoreError(
            f"no held-out images in {what}: {refused} are in {store.url} or views of photos it trained on"
            + (f", {bad} could not be decoded" if bad else "")
            + " — evaluate on photos the store never saw: --source DIR (a folder, a .parquet/.csv list or s3://...)"
        )
    return HeldOut(out, refused, bad)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


def to_grid(dense: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
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
    pictures: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """{"students": {name: {teacher: {res: {"dense_cos", "summary_cos"}}}}, "untrained": ..., ...}.

    ``pictures`` (a dict to fill): for each teacher, at the first partition scored, ``cfg.pictures`` held-out
    photos (uint8 views), the teacher's dense features and each trained student's prediction at the view's own
    size, both in PHI-S space (``radio_dist.train.pictures``)."""
    meta = store.meta()
    partitions = {p: int(px) for p, px in meta.partitions.items()}
    resolutions = cfg.resolutions or sorted(
        {max(32, int(round(px * f / 32)) * 32) for px in partitions.values() for f in (0.5, 1.0, 1.5)}
    )
    # each resolution is scored against the partition whose cached size is closest to it
    part_of = {r: _nearest_partition(partitions, r) for r in resolutions}
    held = held_out_images(store, cfg.source, cfg.images)
    images = held.images
    if progress and held.refused:
        progress(
            f"{held.refused} image(s) of the source left out: in the store, or views of photos it trained on"
        )
    resample = meta.view_resample
    view_codec = store.view_codec(meta)
    teachers_used = sorted({t for s in students.values() for t in s.teacher_names})
    models = dict(students)
    floors = {name: untrained_like(s) for name, s in students.items()}
    any_student = next(iter(students.values()))
    sums: dict[tuple[Any, ...], list[float]] = {}
    for p, px in sorted(partitions.items()):
        if p not in part_of.values():
            continue
        # the held-out views are resampled (and encoded, then decoded) as the store's training views were
        views = np.stack([canonical_view(rgb, px, view, resample)[0] for _, rgb, view in images])
        if view_codec.encoded:
            views = np.stack([view_codec.roundtrip(v)[0] for v in views])
        for t in teachers_used:
            if progress:
                progress(f"teacher {t} at {p}={px}px on {len(views)} held-out images")
            spec = spec_from_record(meta.teachers[t].spec)
            teacher = create_teacher(spec)
            mean = store_mean_targets(store, t, p)
            if pictures is not None and cfg.pictures and t not in pictures:
                pictures[t] = keep_pictures(teacher, t, views[: cfg.pictures], models)
            for i in range(0, len(views), cfg.batch_size):
                chunk = views[i : i + cfg.batch_size]
                ref = teacher(chunk)
                _score_mean(sums, t, px, mean, any_student.phis[t], ref)
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
                            if t in st.teacher_names:
                                _score(sums, (kind, name, t, r), st, t, xr, ref)
            del teacher
    result: dict[str, Any] = {
        "images": len(images),
        "refused": held.refused,
        "undecodable": held.undecodable,
        "source": cfg.source.path or f"sample-photos ({cfg.source.photos.value})",
        "resolutions": resolutions,
        "reference_partition": part_of,
        "students": {},
        "untrained": {},
        "mean_predictor": {},
    }
    for (kind, name, t, r, metric), vals in sorted(sums.items()):
        bucket = result[{"trained": "students", "untrained": "untrained", "mean": "mean_predictor"}[kind]]
        bucket.setdefault(name, {}).setdefault(t, {}).setdefault(str(r), {})[metric] = float(np.mean(vals))
    return result


def keep_pictures(
    teacher: Any, name: str, views: np.ndarray, students: dict[str, LoadedStudent]
) -> dict[str, Any]:
    """The photos, the teacher's dense features and each student's prediction of them, in PHI-S space."""
    ref = teacher(views)
    x = torch.from_numpy(views).permute(0, 3, 1, 2).float().div_(255.0)
    preds, phis = {}, None
    for sname, st in students.items():
        if name in st.teacher_names:
            phis = st.phis[name]
            preds[sname] = st(x)[name]["dense"].float().numpy()  # type: ignore[union-attr]
    assert phis is not None, f"no student predicts teacher {name}"
    return {
        "photos": views.copy(),
        "teacher": np.asarray(phis.forward(ref.dense), dtype=np.float32),
        "students": preds,
    }


def store_mean_targets(
    store: FeatureStore, teacher: str, partition: str, max_shards: int = 8
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cached dense target per grid position (PHI-S space) and mean summary, over the first shards.

    The "mean predictor" floor: a student that learned only the average target scores this, so fidelity
    above it is what the student learned about each image.
    """
    dense_sum, summary_sum, n = None, None, 0
    for sh in committed_shards(store)[:max_shards]:
        d, smry = store.read_targets(sh.shard, teacher, partition)
        dense_sum = d.sum(0) if dense_sum is None else dense_sum + d.sum(0)
        if smry is not None:
            summary_sum = smry.sum(0) if summary_sum is None else summary_sum + smry.sum(0)
        n += len(d)
    if dense_sum is None:
        raise StoreError(f"{store.url}: no committed rows to take mean targets from")
    summary = None if summary_sum is None else torch.from_numpy(summary_sum / n)
    return torch.from_numpy(dense_sum / n), summary


def _score_mean(
    sums: dict[tuple[Any, ...], list[float]],
    teacher: str,
    px: int,
    mean: tuple[torch.Tensor, torch.Tensor | None],
    phis: Any,
    ref: Any,
) -> None:
    b = ref.dense.shape[0]
    dense = to_grid(mean[0][None].expand(b, -1, -1, -1), (int(ref.dense.shape[1]), int(ref.dense.shape[2])))
    ref_phis = torch.as_tensor(phis.forward(ref.dense), dtype=torch.float32)
    key = ("mean", "mean", teacher, px)
    sums.setdefault((*key, "dense_cos"), []).extend(_cos(dense, ref_phis).mean(dim=(1, 2)).tolist())
    raw = torch.as_tensor(phis.inverse(dense), dtype=torch.float32)
    sums.setdefault((*key, "dense_cos_teacher_space"), []).extend(
        _cos(raw, ref.dense).mean(dim=(1, 2)).tolist()
    )
    if mean[1] is not None and ref.summary is not None:
        sums.setdefault((*key, "summary_cos"), []).extend(
            _cos(mean[1][None].expand(b, -1), ref.summary).tolist()
        )


def _score(
    sums: dict[tuple[Any, ...], list[float]],
    key: tuple[str, str, str, int],
    student: LoadedStudent,
    teacher: str,
    images: torch.Tensor,
    ref: Any,
) -> None:
    """Add one batch's per-image cosines: dense in PHI-S space (centred, whitened: a constant guess scores
    ~0) and in teacher space (raw, dominated by the features' mean), summary in teacher space."""
    out = student(images)[teacher]
    dense = to_grid(out["dense"], (int(ref.dense.shape[1]), int(ref.dense.shape[2])))  # type: ignore[arg-type]
    phis = student.phis[teacher]
    ref_phis = torch.as_tensor(phis.forward(ref.dense), dtype=torch.float32)
    sums.setdefault((*key, "dense_cos"), []).extend(_cos(dense, ref_phis).mean(dim=(1, 2)).tolist())
    raw = torch.as_tensor(phis.inverse(dense), dtype=torch.float32)
    sums.setdefault((*key, "dense_cos_teacher_space"), []).extend(
        _cos(raw, ref.dense).mean(dim=(1, 2)).tolist()
    )
    if out["summary"] is not None and ref.summary is not None:
        sums.setdefault((*key, "summary_cos"), []).extend(_cos(out["summary"], ref.summary).tolist())


def load_students(paths: Sequence[str]) -> dict[str, LoadedStudent]:
    out = {}
    for path in paths:
        s = load_student(path)
        out[s.model.spec.name] = s
    return out
