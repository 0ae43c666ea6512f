"""`radio-dist store recode SRC DST --codec ...`: a store's targets re-encoded, without running a teacher again.

DST gets the same ids, rows, views, summaries, teacher fingerprints and PHI-S files (byte-identical) as SRC; only
the dense targets of the named (teacher, partition)s change codec: decoded from SRC's codes and encoded again,
with the fidelity of the new codes measured against what SRC held (recorded ``against: <SRC's codec>``). Shards
keep their ids (they derive from the image ids), so a recode is resumed like every job: re-running it commits
only the shards not yet in DST, and one with other codecs than DST was started with is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from radio_dist.store.codecs import Fidelity, get_codec, load_fidelity
from radio_dist.store.compact import DEFAULT_FANOUT, Compactor
from radio_dist.store.errors import StoreError, StoreMismatchError
from radio_dist.store.feature_store import FeatureStore, codec_problem
from radio_dist.store.lock import WriterLock
from radio_dist.store.manifest import FIDELITY_KEY, ROW_FIELDS, array_key, scale_key
from radio_dist.store.records import StoreMeta
from radio_dist.store.writer import ShardWriter

ProgressFn = Callable[[str, dict[str, Any]], None]
Transform = Callable[[str, str, torch.Tensor], "torch.Tensor | None"]


@dataclass
class RecodeSummary:
    shards: int = 0  # shards of SRC
    skipped: int = 0  # already committed in DST by an earlier run
    written: int = 0
    rows: int = 0  # rows (ok and error) written
    bytes_src: int = 0  # dense-target bytes read / written by this run (codes + scales)
    bytes_dst: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_codec_choices(choices: list[str], meta: StoreMeta) -> dict[tuple[str, str], str]:
    """``--codec`` values (``nf4``: every target; ``T=int8``: one teacher; ``T.P=nf4``: one partition) ->
    (teacher, partition) -> codec, for every target of the store (later choices win)."""
    targets = [(t, p) for t, rec in meta.teachers.items() for p in rec.outputs]
    out = {(t, p): meta.teachers[t].codec_name(p) for t, p in targets}
    for choice in choices:
        where, _, name = choice.rpartition("=")
        get_codec(name)  # an unknown codec is refused before anything is read
        teacher, _, part = where.partition(".")
        hit = [(t, p) for t, p in targets if (not teacher or t == teacher) and (not part or p == part)]
        if not hit:
            raise StoreError(
                f"--codec {choice}: no such target in the store (targets: "
                f"{', '.join(f'{t}.{p}' for t, p in targets)}); use CODEC, TEACHER=CODEC or TEACHER.PARTITION=CODEC"
            )
        for key in hit:
            out[key] = name
    return out


def recode_store(
    src: FeatureStore,
    dst: FeatureStore,
    codecs: dict[tuple[str, str], str],
    workers: int = 2,
    progress: ProgressFn | None = None,
    transform: Transform | None = None,
) -> RecodeSummary:
    """Write DST from SRC with ``codecs`` ((teacher, partition) -> codec); resumable (see the module doc).

    ``transform(teacher, partition, dense)`` (PHI-S space, float) may return other targets for DST — a
    controlled experiment's derived store (``radio-dist experiment shift``); None keeps them."""
    t0 = time.perf_counter()
    if src.url == dst.url:
        raise StoreError(f"store recode: SRC and DST are the same store ({src.url}); name a new DST")
    meta = src.meta()
    if not src.has_phis():
        raise StoreError(
            f"{src.url}: no PHI-S parameters yet (a caching job that never wrote): nothing to recode"
        )
    for (t, p), name in codecs.items():
        dim = meta.teachers[t].outputs[p].dense_dim
        get_codec(name).check_dim(dim, f"teacher {t!r}, partition {p!r}")
    with WriterLock(dst, job="store recode"):
        _init_dst(src, dst, meta, codecs)
        shards = _source_shards(src)
        done = dst.manifest_view(columns=["shard"]).shards
        summary = RecodeSummary(shards=len(shards))
        todo = [s for s in shards if s.shard not in done]
        summary.skipped = len(shards) - len(todo)
        if progress:
            progress("todo", {"shards": len(shards), "todo": len(todo), "skipped": summary.skipped})

        def one(shard: _SourceShard) -> tuple[int, int, int]:
            return _recode_shard(src, dst, meta, codecs, shard, transform)

        compactor = Compactor(dst, defer_delete=True)  # dst's parts stay until the end, as in a caching job
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for rows, b_src, b_dst in pool.map(one, todo):
                summary.written += 1
                summary.rows += rows
                summary.bytes_src += b_src
                summary.bytes_dst += b_dst
                if progress:
                    progress("shard", {"written": summary.written, "todo": len(todo), "rows": summary.rows})
                if summary.written % DEFAULT_FANOUT == 0:
                    compactor.step()
        compactor.step()
        compactor.finish()
    summary.seconds = time.perf_counter() - t0
    return summary


def _init_dst(
    src: FeatureStore, dst: FeatureStore, meta: StoreMeta, codecs: dict[tuple[str, str], str]
) -> None:
    """DST's PHI-S files and ``store.json`` (SRC's, with the new codecs), or a check that DST already is that."""
    want = meta.model_copy(deep=True)
    for t, rec in want.teachers.items():
        rec.codecs = {p: codecs[(t, p)] for p in rec.outputs}
    if dst.exists():
        have = dst.meta()
        a = have.model_dump(exclude={"created_at"})
        b = want.model_dump(exclude={"created_at"})
        if a != b:
            started = {t: r.codecs for t, r in have.teachers.items()}
            same_but_codecs = have.model_copy(deep=True)
            for t, rec in same_but_codecs.teachers.items():
                rec.codecs = want.teachers[t].codecs if t in want.teachers else rec.codecs
            if same_but_codecs.model_dump(exclude={"created_at"}) == b:
                why = f"it was started with the codecs {started}, this run asks for " + str(
                    {t: r.codecs for t, r in want.teachers.items()}
                )
            else:
                why = "it holds another store's teachers, partitions or PHI-S"
            raise StoreMismatchError(
                f"store recode: {dst.url} exists and is not this recode of {src.url}: {why} — re-run with the "
                "codecs it was started with, or name a new DST"
            )
        return
    for rec in meta.teachers.values():
        if rec.phis is not None:
            dst.put_atomic(rec.phis.file, src.get(rec.phis.file))  # byte-identical: the sha256 still holds
    dst.write_meta(want)


@dataclass(frozen=True)
class _SourceShard:
    shard: str
    rows: tuple[dict[str, Any], ...]  # its manifest rows
    fidelity: bytes | None  # the fidelity metadata its rows came with: of its part, or (first shard of a
    # snapshot) of the whole snapshot, so that the recorded fidelity sums over DST as over SRC


def _source_shards(src: FeatureStore) -> list[_SourceShard]:
    out = []
    for _, table in src.manifest_view().objects:
        fid = (table.schema.metadata or {}).get(FIDELITY_KEY)
        by_shard: dict[str, list[dict[str, Any]]] = {}
        for r in table.to_pylist():
            by_shard.setdefault(r["shard"], []).append(r)
        for k, shard in enumerate(sorted(by_shard)):
            out.append(_SourceShard(shard, tuple(by_shard[shard]), fid if k == 0 else None))
    return sorted(out, key=lambda s: s.shard)


def _recode_shard(
    src: FeatureStore,
    dst: FeatureStore,
    meta: StoreMeta,
    codecs: dict[tuple[str, str], str],
    source: _SourceShard,
    transform: Transform | None = None,
) -> tuple[int, int, int]:
    shard = source.shard
    old_fid = load_fidelity(source.fidelity)
    rows = list(source.rows)
    ok = [r for r in rows if r["status"] == "ok"]
    if [r["index"] for r in ok] != list(range(len(ok))):
        raise StoreError(
            f"{src.url}: shard {shard}: rows are not in array order — run `radio-dist store verify`"
        )
    arrays = src.read_shard(shard) if ok else {}
    out: dict[str, np.ndarray] = {}
    b_src = b_dst = 0
    fidelity: dict[tuple[str, str], tuple[str, str, Fidelity]] = {}
    targets = {array_key(t, p, "dense"): (t, p) for t, rec in meta.teachers.items() for p in rec.outputs}
    scales = {scale_key(t, p) for t, p in targets.values()}
    for name, arr in arrays.items():
        if name in scales:
            continue
        if name not in targets:
            out[name] = arr  # views and summaries, as they are
            continue
        t, p = targets[name]
        old = src.codec(t, p, meta)
        new = get_codec(codecs[(t, p)])
        scale = arrays.get(scale_key(t, p))
        problem = codec_problem(old, arr, scale, tuple(meta.teachers[t].outputs[p].dense))
        if problem:
            raise StoreError(f"{src.url}: shard {shard}, {name}: {problem}; run `radio-dist store verify`")
        b_src += arr.nbytes + (scale.nbytes if scale is not None else 0)
        # unchanged: the codes as they are, with the fidelity they were written with
        if new.name == old.name and transform is None:
            out[name] = arr
            if scale is not None:
                out[scale_key(t, p)] = scale
            key = f"{t}/{p}"
            if key in old_fid:
                fidelity[(t, p)] = old_fid[key]
        else:
            ref = old.decode(
                torch.from_numpy(arr), None if scale is None else torch.from_numpy(scale)
            ).float()
            changed = transform(t, p, ref) if transform is not None else None
            ref = ref if changed is None else changed.float()
            codes, new_scale = new.encode(ref)
            fidelity[(t, p)] = (new.name, old.name, Fidelity.measure(ref, new.decode(codes, new_scale)))
            out[name] = codes.numpy()
            if new_scale is not None:
                out[scale_key(t, p)] = new_scale.numpy()
        b_dst += out[name].nbytes + (out[scale_key(t, p)].nbytes if new.has_scale else 0)
    with ShardWriter(dst, [r["id"] for r in rows]) as w:
        for name, arr in out.items():
            w.add_array(name, arr)
        w.add_rows([{k: r.get(k) for k in ROW_FIELDS} for r in rows])
        for (t, p), (codec, against, fid) in fidelity.items():
            w.add_fidelity(t, p, codec, against, fid)
    assert w.result is not None
    if w.result.shard != shard:
        raise StoreError(
            f"{src.url}: shard {shard} holds ids of shard {w.result.shard} — run `radio-dist store verify`"
        )
    return len(rows), b_src, b_dst
