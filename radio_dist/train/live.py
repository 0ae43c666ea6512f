"""Teachers that run live inside the training workers, beside the store's cached ones.

A distillation job names them in ``live_teachers``: a full teacher spec (a cheap teacher, or a new one added
without re-caching the store), or the name of a teacher the store caches (its recorded spec runs live — with
every teacher live this is the "online" baseline the store is measured against). Each step, the worker runs
them on the batch's images — the same canonical views the caching job fed the cached teachers, read from the
store — and normalizes the dense outputs with their own PHI-S. The students see live targets exactly like
cached ones: same heads, same losses.

PHI-S is fitted on first use, the way the caching job fits it (moments of the raw dense features of the
first ``live_fit_images`` images by id, all trained partitions pooled; summary dispersion alike), by rank 0,
and saved under ``OUT/live/<teacher>/`` with the output shapes; every worker and every later attempt loads
it from there, so a relaunch trains against the same normalization.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from radio_dist.phis import Moments, PhiS, angular_dispersion, fit_phis
from radio_dist.store import FeatureStore, StoreMismatchError, image_key
from radio_dist.store.views import views_of
from radio_dist.teacher import Teacher, TeacherSpec, spec_from_record
from radio_dist.train.reader import ShardRows
from radio_dist.train.rundir import RunDir
from radio_dist.train.students import TeacherHeadInfo

LIVE_DIR = "live"


def live_specs(entries: Sequence[TeacherSpec | str], store: FeatureStore) -> list[TeacherSpec]:
    """The job's live teachers as specs: a name stands for the spec the store recorded for that teacher."""
    meta = store.meta()
    out = []
    for e in entries:
        if isinstance(e, TeacherSpec):
            out.append(e)
            continue
        rec = meta.teachers.get(e)
        if rec is None:
            raise StoreMismatchError(
                f"live teacher {e!r} is not a teacher of store {store.url} (it has {sorted(meta.teachers)}): "
                "name one of those, or give a full teacher spec"
            )
        if not rec.spec or "family" not in rec.spec:
            raise StoreMismatchError(
                f"store {store.url} does not record a runnable spec for teacher {e!r} (family {rec.family}); "
                "give its full spec in live_teachers"
            )
        out.append(spec_from_record(rec.spec))
    return out


@dataclass
class LiveInfo:
    """What a live teacher's first use fixed: its PHI-S, head shapes, summary dispersion (saved in OUT)."""

    phis: PhiS
    head: TeacherHeadInfo
    dispersion: float | None
    fingerprint: str
    phis_sha256: str
    fit_images: int


def _phis_bytes(phis: PhiS) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in phis.to_arrays().items()})


def save_live(out: RunDir, name: str, info: LiveInfo) -> None:
    blob = _phis_bytes(info.phis)
    with out.open(f"{LIVE_DIR}/{name}/phis.safetensors", "wb") as f:
        f.write(blob)
    meta = {
        "fingerprint": info.fingerprint,
        "phis_sha256": hashlib.sha256(blob).hexdigest(),
        "summary_dim": info.head.summary_dim,
        "dense_dim": info.head.dense_dim,
        "dispersion": info.dispersion,
        "fit_images": info.fit_images,
    }
    with out.open(f"{LIVE_DIR}/{name}/info.json", "w") as f:  # written last: its presence means complete
        f.write(json.dumps(meta, indent=1))


def load_live(out: RunDir, name: str) -> LiveInfo | None:
    """A live teacher's saved first-use state, or None when it was never fitted in this run directory."""
    from safetensors.numpy import load

    if not out.exists(f"{LIVE_DIR}/{name}/info.json"):
        return None
    meta = json.loads("\n".join(out.read_lines(f"{LIVE_DIR}/{name}/info.json")))
    with out.open(f"{LIVE_DIR}/{name}/phis.safetensors", "rb") as f:
        blob = f.read()
    return LiveInfo(
        phis=PhiS.from_arrays(load(blob)),
        head=TeacherHeadInfo(summary_dim=meta["summary_dim"], dense_dim=meta["dense_dim"]),
        dispersion=meta["dispersion"],
        fingerprint=meta["fingerprint"],
        phis_sha256=hashlib.sha256(blob).hexdigest(),
        fit_images=int(meta["fit_images"]),
    )


def fit_images(
    store: FeatureStore, shards: Sequence[ShardRows], partitions: Sequence[str], n: int
) -> dict[str, np.ndarray]:
    """The first ``n`` images by id of the run's shards, per partition (uint8 NHWC as stored)."""
    rows = sorted((rid, s.shard, i) for s in shards for i, rid in enumerate(s.ids))[:n]
    by_shard: dict[str, list[int]] = {}
    for _, shard, i in rows:
        by_shard.setdefault(shard, []).append(i)
    out: dict[str, list[np.ndarray]] = {p: [] for p in partitions}
    meta = store.meta()
    codec = store.view_codec(meta)
    for shard, idx in sorted(by_shard.items()):
        arrays = store.read_shard(shard, [image_key(p) for p in partitions])
        for p in partitions:
            stored = np.asarray(arrays[image_key(p)])[np.asarray(idx)]
            out[p].append(views_of(codec, stored, meta.partitions[p], f"{store.url}: shard {shard}"))
    return {p: np.concatenate(v) for p, v in out.items()}


def run_teacher(
    teacher: Teacher, images: torch.Tensor | np.ndarray, partition: str, sizes: dict[str, int]
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(summary, dense) in the teacher's raw space for uint8 NHWC views of ``partition``."""
    out = teacher.run_views(images, partition, sizes[partition])
    return out.summary, out.dense


class LiveTeacher:
    """One live teacher on a worker's device: the model, its PHI-S, and the targets of a batch."""

    def __init__(self, spec: TeacherSpec, teacher: Teacher, info: LiveInfo, sizes: dict[str, int]) -> None:
        self.spec, self.teacher, self.info, self.sizes = spec, teacher, info, sizes

    @property
    def name(self) -> str:
        return self.spec.name

    def raw(
        self, images: torch.Tensor | np.ndarray, partition: str
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        return run_teacher(self.teacher, images, partition, self.sizes)

    def targets(self, images: torch.Tensor, partition: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(raw summary, PHI-S-space dense) of a batch — what the store would hold for these views."""
        summary, dense = self.raw(images, partition)
        normed = self.info.phis.forward(dense)
        assert isinstance(normed, torch.Tensor)
        return summary, normed


def fit_live(
    spec: TeacherSpec,
    teacher: Teacher,
    images: dict[str, np.ndarray],
    sizes: dict[str, int],
    fingerprint: str,
    seed: int = 0,
) -> LiveInfo:
    """A live teacher's first use: PHI-S from the raw dense features of ``images`` (partitions pooled), head
    shapes and summary dispersion — as the caching job fits them."""
    moments: Moments | None = None
    summaries = []
    dims: tuple[int | None, int] | None = None
    n = 0
    for p, views in images.items():
        summary, dense = run_teacher(teacher, views, p, sizes)
        m = Moments.from_features(dense.detach().cpu().double().numpy())
        moments = m if moments is None else moments.merge(m)
        if summary is not None:
            summaries.append(summary.detach().cpu().numpy())
        dims = (None if summary is None else int(summary.shape[-1]), int(dense.shape[-1]))
        n = len(views)
    assert moments is not None and dims is not None
    phis = fit_phis(moments, seed=seed)
    disp = float(angular_dispersion(np.concatenate(summaries))) if summaries else None
    return LiveInfo(
        phis=phis,
        head=TeacherHeadInfo(summary_dim=dims[0], dense_dim=dims[1]),
        dispersion=disp,
        fingerprint=fingerprint,
        phis_sha256=hashlib.sha256(_phis_bytes(phis)).hexdigest(),
        fit_images=n,
    )
