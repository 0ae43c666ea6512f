"""`radio-dist store audit`: a cached teacher re-run live on sampled rows and compared with what the store holds.

Checksums prove that a store's bytes are the bytes its writer wrote; they cannot tell whether those bytes are
the teacher's outputs for the row's image. The audit can: it rebuilds the teacher from the spec the store
recorded (weights from the same file, or ``weights=`` where the file has moved), runs it on ``rows`` sampled
rows' canonical views exactly as the caching job ran it (``Teacher.run_views``), applies the store's PHI-S, and
compares the result with the stored targets after decoding — per token, the way fidelity is measured when a
shard is written (``Fidelity``). It catches wrong weights, preprocessing that drifted between library
versions, and targets written against the wrong image or corrupted before they were checksummed.

The threshold follows from the store: each partition's targets were measured against the teacher's float
output when written (``store info`` shows it), so a faithful store re-measured live must give that fidelity
again, less numerical drift (``tolerance``: another device, library build or batch composition). A partition
fails when its mean or 1st-percentile token cosine falls more than ``tolerance`` below the recorded one, when a
single row's mean cosine falls below the recorded 1st percentile minus ``tolerance``, or when a row's summary
(stored as float32) is further than ``tolerance`` from the live one in cosine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import zarr

from radio_dist.store import FeatureStore, StoreError, array_key, image_key
from radio_dist.store.chunks import array_names
from radio_dist.store.codecs import Fidelity, fidelity_key
from radio_dist.store.feature_store import codec_problem
from radio_dist.store.manifest import scale_key
from radio_dist.store.views import views_of
from radio_dist.teacher import TeacherSpec, WeightsKind, create_teacher, fingerprint, spec_from_record

DEFAULT_ROWS = 16
DEFAULT_TOLERANCE = 0.003
ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class AuditRow:
    shard: str
    index: int
    id: str


@dataclass
class RowCheck:
    shard: str
    index: int
    id: str
    cos_mean: float  # of the row's tokens, live vs stored (PHI-S space)
    rel_mse: float
    summary_cos: float | None  # live vs stored summary (raw teacher space)


@dataclass
class PartitionAudit:
    partition: str
    codec: str
    rows: int
    tokens: int
    cos_mean: float
    cos_p1: float
    rel_mse: float
    recorded: dict[str, Any] | None  # the fidelity measured when written: codec, against, cos_mean, cos_p1, …
    floor_mean: float
    floor_p1: float
    floor_row: float
    summary_cos_min: float | None
    worst: list[RowCheck]  # the rows of lowest cosine, worst first
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class AuditReport:
    store: str
    teacher: str
    device: str
    seed: int
    tolerance: float
    fingerprint_recorded: str
    fingerprint_now: str | None  # None: the weights could not be hashed as recorded
    partitions: list[PartitionAudit]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.partitions)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        for p, pd in zip(self.partitions, d["partitions"], strict=True):
            pd["passed"] = p.passed
        return d


def sample_rows(store: FeatureStore, n: int, seed: int) -> list[AuditRow]:
    """``n`` ok rows drawn without replacement by ``seed`` (all of them if the store has fewer), in store order."""
    table = store.manifest(columns=["id", "shard", "index", "status"])
    table = table.filter(pc.equal(table.column("status"), "ok"))
    if table.num_rows == 0:
        raise StoreError(f"{store.url}: no committed rows to audit (run `radio-dist cache-teachers` first)")
    pick = np.random.default_rng(seed).choice(table.num_rows, size=min(n, table.num_rows), replace=False)
    t = table.take(np.sort(pick))
    rows = [
        AuditRow(s, int(i), r)
        for s, i, r in zip(
            t.column("shard").to_pylist(),
            t.column("index").to_pylist(),
            t.column("id").to_pylist(),
            strict=True,
        )
    ]
    return sorted(rows, key=lambda r: (r.shard, r.index))


def audit_spec(store: FeatureStore, teacher: str, weights: str | None = None) -> TeacherSpec:
    """The spec the store recorded for ``teacher``, runnable here (``weights``: the weights file's new path)."""
    meta = store.meta()
    rec = meta.teachers.get(teacher)
    if rec is None:
        raise StoreError(
            f"{store.url}: no teacher {teacher!r} in this store (it has {sorted(meta.teachers)})"
        )
    if rec.phis is None:
        raise StoreError(
            f"{store.url}: teacher {teacher!r} has no PHI-S yet (its caching job never got past the fit)"
        )
    if not rec.spec or "family" not in rec.spec:
        raise StoreError(
            f"{store.url}: the store records no runnable spec for teacher {teacher!r} (family {rec.family}); "
            "it cannot be audited"
        )
    spec = spec_from_record(rec.spec)
    if weights is not None:
        if not Path(weights).expanduser().is_file():
            raise FileNotFoundError(f"--weights {weights}: no such file")
        spec = spec.model_copy(
            update={"weights": spec.weights.model_copy(update={"kind": WeightsKind.file, "path": weights})}
        )
    elif (
        spec.weights.kind == WeightsKind.file
        and spec.weights.path
        and not Path(spec.weights.path).expanduser().is_file()
    ):
        raise FileNotFoundError(
            f"teacher {teacher!r}: the weights file the store recorded, {spec.weights.path}, is not on this machine; "
            "pass --weights PATH (its checksum is compared with the store's fingerprint)"
        )
    return spec


def _read_rows(
    store: FeatureStore, shard: str, index: list[int], keys: Sequence[str]
) -> dict[str, np.ndarray]:
    """Only the chunks that hold rows ``index`` of each array (an audit of a few rows reads a few rows)."""
    group = store.open_shard(shard)
    names = set(array_names(group))
    idx = np.asarray(index)
    out = {}
    for k in keys:
        if k not in names:
            continue
        try:
            arr = group[k]
            assert isinstance(arr, zarr.Array)
            out[k] = np.asarray(arr.oindex[idx])
        except Exception as e:  # a truncated or missing chunk: name it
            raise StoreError(
                f"{store.url}: shard {shard}, array {k}: {e}; run `radio-dist store verify`"
            ) from e
    return out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b) / max(na * nb, 1e-300)


def audit_teacher(
    store: FeatureStore,
    teacher: str,
    rows: int = DEFAULT_ROWS,
    partitions: Sequence[str] | None = None,
    seed: int = 0,
    weights: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str | None = None,
    worst: int = 3,
    progress: ProgressFn | None = None,
) -> AuditReport:
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    meta = store.meta()
    spec = audit_spec(store, teacher, weights)
    rec = meta.teachers[teacher]
    recorded_spec = spec_from_record(rec.spec)
    parts = list(partitions) if partitions else sorted(rec.outputs)
    unknown = [p for p in parts if p not in rec.outputs]
    if unknown:
        raise StoreError(
            f"{store.url}: teacher {teacher!r} has no targets for partition(s) {unknown} "
            f"(it has {sorted(rec.outputs)})"
        )
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    try:
        now: str | None = fingerprint(recorded_spec, weights_file=weights)
    except (OSError, ValueError) as e:
        now = None
        notes.append(f"fingerprint not computed: {e}")
    if now is not None and now != rec.fingerprint:
        notes.append(
            f"fingerprint {now} differs from the store's {rec.fingerprint}: the weights or the spec changed since "
            "caching"
        )
    sample = sample_rows(store, rows, seed)
    if progress:
        progress(f"audit {teacher}: {len(sample)} rows, partitions {', '.join(parts)}, on {dev}")
    model = create_teacher(spec, device=dev)
    phis = store.phis(teacher)
    recorded = store.fidelity()
    by_shard: dict[str, list[AuditRow]] = {}
    for r in sample:
        by_shard.setdefault(r.shard, []).append(r)
    out = []
    for p in parts:
        codec = store.codec(teacher, p, meta)
        shapes = rec.outputs[p]
        dkey, skey, sckey = (
            array_key(teacher, p, "dense"),
            array_key(teacher, p, "summary"),
            scale_key(teacher, p),
        )
        checks: list[RowCheck] = []
        total = Fidelity()
        for n_done, (shard, rs) in enumerate(sorted(by_shard.items())):
            arrays = _read_rows(store, shard, [r.index for r in rs], [image_key(p), dkey, sckey, skey])
            if dkey not in arrays or image_key(p) not in arrays:
                raise StoreError(
                    f"{store.url}: shard {shard} has no {dkey} or {image_key(p)}; run `radio-dist store verify`"
                )
            scale = arrays.get(sckey)
            problem = codec_problem(codec, arrays[dkey], scale, tuple(shapes.dense))
            if problem:
                raise StoreError(
                    f"{store.url}: shard {shard}, {dkey}: {problem}; run `radio-dist store verify`"
                )
            stored = torch.from_numpy(np.asarray(codec.decode_numpy(arrays[dkey], scale), np.float32))
            views = views_of(
                store.view_codec(meta),
                arrays[image_key(p)],
                meta.partitions[p],
                f"{store.url}: shard {shard}",
            )
            live = model.run_views(views, p, meta.partitions[p])
            dense = phis.forward(live.dense.float().cpu())
            assert isinstance(dense, torch.Tensor)
            if tuple(dense.shape) != tuple(stored.shape):
                raise StoreError(
                    f"{store.url}: teacher {teacher!r} at {p} now gives targets of shape {tuple(dense.shape[1:])}, the "
                    f"store holds {tuple(stored.shape[1:])}: not the teacher that wrote it"
                )
            vectors = Fidelity.per_image(dense, stored)
            for i, r in enumerate(rs):
                f = Fidelity.from_vector(vectors[i])
                total = total.merge(f)
                s_cos = None
                if live.summary is not None and skey in arrays:
                    s_cos = _cos(
                        live.summary[i].cpu(), torch.from_numpy(np.asarray(arrays[skey][i], np.float32))
                    )
                checks.append(RowCheck(r.shard, r.index, r.id, f.cos_mean, f.rel_mse, s_cos))
            if progress and (n_done + 1) % 8 == 0:
                progress(f"audit {teacher} {p}: {n_done + 1}/{len(by_shard)} shards")
        rec_f = recorded.get(fidelity_key(teacher, p))
        ref_mean, ref_p1 = (rec_f[2].cos_mean, rec_f[2].cos_quantile(0.01)) if rec_f else (1.0, 1.0)
        if not rec_f:
            notes.append(f"{p}: no fidelity recorded (a store from before codecs): measured against 1.0")
        result = PartitionAudit(
            partition=p,
            codec=codec.name,
            rows=len(checks),
            tokens=total.tokens,
            cos_mean=total.cos_mean,
            cos_p1=total.cos_quantile(0.01),
            rel_mse=total.rel_mse,
            recorded=None
            if rec_f is None
            else {"codec": rec_f[0], "against": rec_f[1], **rec_f[2].summary()},
            floor_mean=ref_mean - tolerance,
            floor_p1=ref_p1 - tolerance,
            floor_row=ref_p1 - tolerance,
            summary_cos_min=min((c.summary_cos for c in checks if c.summary_cos is not None), default=None),
            worst=sorted(checks, key=lambda c: c.cos_mean)[:worst],
        )
        if result.cos_mean < result.floor_mean:
            result.failures.append(f"mean token cosine {result.cos_mean:.6f} < {result.floor_mean:.6f}")
        if result.cos_p1 < result.floor_p1:
            result.failures.append(f"1st-percentile token cosine {result.cos_p1:.6f} < {result.floor_p1:.6f}")
        bad = [c for c in checks if c.cos_mean < result.floor_row]
        if bad:
            result.failures.append(
                f"{len(bad)} row(s) below {result.floor_row:.6f}: "
                + ", ".join(
                    f"shard {c.shard} row {c.index} (id {c.id}) cos {c.cos_mean:.4f}" for c in bad[:5]
                )
            )
        bad_s = [c for c in checks if c.summary_cos is not None and c.summary_cos < 1 - tolerance]
        if bad_s:
            result.failures.append(
                f"{len(bad_s)} summary(ies) below cosine {1 - tolerance:.6f}: "
                + ", ".join(f"shard {c.shard} row {c.index} cos {c.summary_cos:.4f}" for c in bad_s[:5])
            )
        out.append(result)
    return AuditReport(
        store=store.url,
        teacher=teacher,
        device=dev,
        seed=seed,
        tolerance=tolerance,
        fingerprint_recorded=rec.fingerprint,
        fingerprint_now=now,
        partitions=out,
        notes=notes,
    )
