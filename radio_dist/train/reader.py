"""Streaming cached targets out of a feature store into training workers — deterministically and resumably.

The order in which samples are seen is a pure function of (committed shards, epoch, seed, workers, batch size):
``epoch_plan`` permutes the shards, assigns them to workers balancing row counts (each worker reads only its
own shards), and shuffles samples inside windows of ``shuffle_shards`` consecutive shards. A worker's step
``s`` is slice ``s`` of its stream, so a training job that checkpoints "next step = s" resumes by rebuilding
the plan and starting at ``s``: every sample of the epoch is seen exactly once, whatever was killed.
(Ray Data's iterators cannot be resumed after a failure, which is why the plan lives here.)

``ShardStream`` reads a worker's plan with a background thread that loads the next window of shards while
the current one is consumed (prefetch), and yields one ``Batch`` per step. Every step of an epoch exists on
every worker; a worker whose shards ran out yields empty batches so collective ops stay in lockstep.
"""

from __future__ import annotations

import hashlib
import heapq
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from radio_dist.config import StrictModel
from radio_dist.store import FeatureStore, StoreError, array_key, image_key
from radio_dist.store.codecs import TargetCodec
from radio_dist.store.feature_store import codec_problem
from radio_dist.store.manifest import gc_paused, scale_key


class ReaderConfig(StrictModel):
    """How training workers read the store."""

    shuffle_shards: int = Field(
        4, ge=1, description="Shards whose samples are shuffled together (the shuffle buffer, in shards)."
    )
    prefetch_windows: int = Field(1, ge=0, description="Windows of shards loaded ahead of the one in use.")
    read_threads: int = Field(
        4, ge=1, description="Parallel array reads per window (object stores like many)."
    )


class ShardRows(NamedTuple):
    """The ok rows of one committed shard: ids in shard-array order (a tuple: a million are made in a second)."""

    shard: str
    ids: tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    shard: str
    index: int
    id: str


def committed_shards(store: FeatureStore) -> list[ShardRows]:
    """Every committed shard with its ok rows (sorted by shard id; error rows never reach training).

    Columnar (sorted and checked in Arrow, not row by row): a million shards' manifest is planned in seconds."""
    table = store.manifest(columns=["id", "shard", "index", "status"])
    ok = pc.equal(table.column("status"), "ok")
    if not pc.all(ok).as_py():
        table = table.filter(ok)
    if table.num_rows == 0:
        return []
    # group rows by shard (shards in id order, rows in index order) on integer keys, not strings
    encoded = table.column("shard").combine_chunks().dictionary_encode()
    names_arr, codes = encoded.dictionary, encoded.indices.to_numpy()
    by_name = pc.sort_indices(names_arr).to_numpy()
    rank = np.empty_like(by_name)
    rank[by_name] = np.arange(len(by_name))
    index = table.column("index").to_numpy().astype(np.int64)
    order = np.argsort(rank[codes].astype(np.int64) * (int(index.max()) + 1) + index, kind="stable")
    counts = np.bincount(rank[codes], minlength=len(by_name))
    bounds = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=bounds[1:])
    expected = np.arange(table.num_rows) - np.repeat(bounds[:-1], counts)
    bad = np.flatnonzero(index[order] != expected)
    names = names_arr.take(pa.array(by_name)).to_numpy(zero_copy_only=False).tolist()
    if len(bad):
        shard = names[int(np.searchsorted(bounds, bad[0], side="right")) - 1]
        raise StoreError(f"{store.url}: shard {shard} has non-contiguous row indices — run `store verify`")
    with gc_paused():  # a million tuples: the cyclic collector would rescan them as they are made
        ids = table.column("id").to_numpy()[order].tolist()
        return [
            ShardRows(name, tuple(ids[a:b]))
            for name, a, b in zip(names, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        ]


def shards_digest(shards: Sequence[ShardRows]) -> str:
    """Identity of a training run's data: changes if any shard or row is added or removed."""
    h = hashlib.sha256()
    for s in shards:
        h.update(s.shard.encode())
        h.update(str(len(s.ids)).encode())
    return h.hexdigest()[:16]


def _rng(*keys: int) -> np.random.Generator:
    # the same generator as default_rng([...]) of the keys as Python ints, made in half the time (an epoch of a
    # million shards makes one per shuffle window)
    return np.random.default_rng(np.array([int(k) & 0xFFFFFFFF for k in keys], dtype=np.uint32))


class _Rows:
    """The rows of a list of shards, flattened: row ``k`` of shard ``j`` is position ``offsets[j] + k``."""

    def __init__(self, shards: Sequence[ShardRows]) -> None:
        self.names = [s.shard for s in shards]
        self.counts = np.fromiter((len(s.ids) for s in shards), np.int64, len(shards))
        self.offsets = np.zeros(len(shards) + 1, np.int64)
        np.cumsum(self.counts, out=self.offsets[1:])
        self.shard_of = np.repeat(np.arange(len(shards), dtype=np.int64), self.counts)
        with gc_paused():
            self.ids = [i for s in shards for i in s.ids]

    def sample(self, pos: int) -> Sample:
        j = int(self.shard_of[pos])
        return Sample(self.names[j], pos - int(self.offsets[j]), self.ids[pos])


class SampleSeq(Sequence[Sample]):
    """A worker's samples in order, held as positions into ``_Rows`` (a Sample is made when asked for).

    The samples come window by window (``bounds[k]:bounds[k + 1]`` is shuffle window k); each window's rows are
    permuted by the generator of ``keys + (k, 0x5EED)`` the first time any of them is asked for, so planning an
    epoch of a million shards makes no generator per window up front (a worker reads its windows in order)."""

    def __init__(
        self,
        rows: _Rows,
        positions: np.ndarray,
        bounds: np.ndarray | None = None,
        keys: tuple[int, ...] | None = None,
    ) -> None:
        self._rows, self._pos, self._keys = rows, positions, keys
        self.bounds = np.array([0, len(positions)], np.int64) if bounds is None else bounds
        self._out = positions if keys is None else np.empty_like(positions)
        self._done = np.full(len(self.bounds) - 1, keys is None)
        self._lock = threading.Lock()

    def window_of(self, i: int) -> int:
        """The window that sample ``i`` is in (``len(self)``: past the last window)."""
        return int(np.searchsorted(self.bounds, i, side="right")) - 1

    def _ensure(self, a: int, b: int) -> None:
        if b <= a or self._keys is None:
            return
        with self._lock:
            for k in range(self.window_of(a), self.window_of(b - 1) + 1):
                if not self._done[k]:
                    lo, hi = int(self.bounds[k]), int(self.bounds[k + 1])
                    perm = _rng(*self._keys, k, 0x5EED).permutation(hi - lo)
                    self._out[lo:hi] = self._pos[lo:hi][perm]
                    self._done[k] = True

    @property
    def positions(self) -> np.ndarray:
        self._ensure(0, len(self))
        return self._out

    def __len__(self) -> int:
        return len(self._pos)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                self._ensure(start, stop)
                return SampleSeq(self._rows, self._out[start:stop])
            return SampleSeq(self._rows, self.positions[i])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        self._ensure(i, i + 1)
        return self._rows.sample(int(self._out[i]))

    def __iter__(self) -> Iterator[Sample]:
        sample = self._rows.sample
        return (sample(p) for p in self.positions.tolist())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SampleSeq):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"SampleSeq({len(self)} samples)"


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's view of one epoch: its shards and its samples in order, cut into ``steps`` batches."""

    epoch: int
    worker: int
    batch_size: int
    steps: int
    windows: tuple[tuple[str, ...], ...]  # shard ids, in read order, grouped into shuffle windows
    samples: SampleSeq  # window by window: samples.bounds[k]:samples.bounds[k + 1] are windows[k]'s

    def batch(self, step: int) -> tuple[Sample, ...]:
        return tuple(self.samples[step * self.batch_size : (step + 1) * self.batch_size])


def epoch_plan(
    shards: Sequence[ShardRows],
    epoch: int,
    seed: int,
    num_workers: int,
    batch_size: int,
    shuffle_shards: int,
    exclude: frozenset[tuple[str, int]] = frozenset(),
    segment: int = 0,
) -> list[WorkerPlan]:
    """The epoch's sample order for every worker (pure; identical on every worker and across restarts).

    ``exclude`` (``(shard, row)`` pairs) leaves out samples an earlier segment of the epoch already trained on:
    a job relaunched with other settings re-plans the rest of the epoch (``radio_dist.train.epochs``);
    ``segment`` > 0 keys that re-plan's shuffles apart from the epoch's first plan.

    The order: shards permuted by (seed, epoch), each given to the worker with the fewest rows so far (ties to
    the lowest rank), a worker's shards cut into windows of ``shuffle_shards`` and each window's rows permuted by
    (seed, epoch, worker, window). Computed on arrays (the same order the row-by-row version of earlier
    releases gave, so checkpoints taken mid-epoch resume on it).
    """
    if num_workers < 1 or batch_size < 1 or shuffle_shards < 1:
        raise ValueError(
            f"num_workers, batch_size and shuffle_shards must be >= 1, got {num_workers}, {batch_size}, "
            f"{shuffle_shards}"
        )
    seg = (segment,) if segment else ()  # segment 0 keeps the keys every earlier release used
    rows = _Rows(shards)
    keep: np.ndarray | None = None
    live = rows.counts
    if exclude:
        keep = np.ones(len(rows.ids), bool)
        where = {name: j for j, name in enumerate(rows.names)}
        for shard, r in exclude:
            j = where.get(shard)
            if j is not None and 0 <= r < rows.counts[j]:
                keep[rows.offsets[j] + r] = False
        live = np.bincount(rows.shard_of[keep], minlength=len(shards))
    order = _rng(seed, epoch, *seg, 0xA11).permutation(len(shards))
    heap = [
        (0, w) for w in range(num_workers)
    ]  # (rows so far, rank): heap[0] is the least loaded, lowest rank
    assigned: list[list[int]] = [[] for _ in range(num_workers)]
    live_list = live.tolist()
    for j in order.tolist():
        n = live_list[j]
        if not n:
            continue  # every row of it was trained on earlier in the epoch
        load, w = heap[0]
        assigned[w].append(j)
        heapq.heapreplace(heap, (load + n, w))
    plans = []
    for w, mine in enumerate(assigned):
        idx = np.asarray(mine, np.int64)
        names = [rows.names[j] for j in mine]
        lens = rows.counts[idx]
        # every row of the worker's shards in order: a range per shard
        pos = np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(
            rows.offsets[idx] - np.cumsum(lens) + lens, lens
        )
        window_of = np.repeat(np.arange(len(mine), dtype=np.int64) // shuffle_shards, lens)
        if keep is not None:
            window_of = window_of[keep[pos]]
            pos = pos[keep[pos]]
        n_windows = -(-len(mine) // shuffle_shards)
        bounds = np.searchsorted(window_of, np.arange(n_windows + 1)).astype(np.int64)
        plans.append(
            WorkerPlan(
                epoch=epoch,
                worker=w,
                batch_size=batch_size,
                steps=0,
                windows=tuple(
                    tuple(names[i : i + shuffle_shards]) for i in range(0, len(names), shuffle_shards)
                ),
                samples=SampleSeq(rows, pos, bounds, (seed, epoch, *seg, w)),
            )
        )
    steps = max(-(-len(p.samples) // batch_size) for p in plans) if plans else 0
    return [WorkerPlan(p.epoch, p.worker, p.batch_size, steps, p.windows, p.samples) for p in plans]


@dataclass
class Batch:
    """One step's data on one worker (possibly empty at the end of an epoch)."""

    epoch: int
    step: int
    ids: list[str]  # row k of every array belongs to ids[k]
    images: np.ndarray  # uint8 [n, P, P, 3] canonical views of the partition
    dense: dict[
        str, np.ndarray
    ]  # teacher -> codes of [n, h, w, C] PHI-S targets, as stored: decode on device
    summary: dict[str, np.ndarray | None]  # teacher -> float32 [n, C] (raw teacher space) or None
    partition: str
    read_wait_s: float = 0.0  # time the consumer waited for this batch's data
    extra: dict[str, Any] = field(default_factory=dict)
    dense_scale: dict[str, np.ndarray] = field(default_factory=dict)  # teacher -> scales (quantized codecs)
    codecs: dict[str, TargetCodec] = field(default_factory=dict)  # teacher -> codec (absent: fp16 values)

    def __len__(self) -> int:
        return len(self.ids)


class ShardStream:
    """Iterate one worker's plan from ``start_step`` on, reading windows of shards in the background.

    ``partition_of_step(step) -> partition`` picks which cached partition each step trains on (all workers
    must agree; the training loop derives it from the seed). Only that partition's arrays are materialized.
    """

    def __init__(
        self,
        store: FeatureStore,
        plan: WorkerPlan,
        teachers: Sequence[str],
        partitions: Sequence[str],
        partition_of_step: Any,
        cfg: ReaderConfig | None = None,
        start_step: int = 0,
    ) -> None:
        self.store = store
        self.plan = plan
        self.teachers = list(teachers)
        self.partitions = list(partitions)
        self.partition_of_step = partition_of_step
        self.cfg = cfg or ReaderConfig()
        self.start_step = start_step
        meta = store.meta()
        self.shapes: dict[str, tuple[int, ...]] = {}  # row shape of every array read (for empty batches)
        self.dtypes: dict[str, Any] = {}
        self.summary_keys: dict[tuple[str, str], bool] = {}
        self.codecs: dict[tuple[str, str], TargetCodec] = {}
        self.dense_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        for p in self.partitions:
            px = int(meta.partitions[p])
            self.shapes[image_key(p)] = (px, px, 3)
            self.dtypes[image_key(p)] = np.uint8
            for t in self.teachers:
                outputs = meta.teachers[t].outputs.get(p)
                if outputs is None:
                    raise StoreError(f"{store.url}: teacher {t!r} has no outputs for partition {p!r}")
                codec = store.codec(t, p, meta)
                self.codecs[(t, p)] = codec
                self.dense_shapes[(t, p)] = tuple(outputs.dense)
                self.shapes[array_key(t, p, "dense")] = codec.code_shape(tuple(outputs.dense))
                self.dtypes[array_key(t, p, "dense")] = codec.code_dtype
                sshape = codec.scale_shape(tuple(outputs.dense))
                if sshape is not None:
                    self.shapes[scale_key(t, p)] = sshape
                    self.dtypes[scale_key(t, p)] = np.dtype(np.float16)
                self.summary_keys[(t, p)] = bool(outputs.summary)
                if outputs.summary:
                    self.shapes[array_key(t, p, "summary")] = tuple(outputs.summary)

    def _names(self) -> list[str]:
        names = []
        for p in self.partitions:
            names.append(image_key(p))
            for t in self.teachers:
                names.append(array_key(t, p, "dense"))
                if self.codecs[(t, p)].has_scale:
                    names.append(scale_key(t, p))
                if self.summary_keys[(t, p)]:
                    names.append(array_key(t, p, "summary"))
        return names

    def _load_window(
        self, shards: tuple[str, ...], pool: ThreadPoolExecutor
    ) -> dict[str, dict[str, np.ndarray]]:
        names = self._names()

        def one(shard: str) -> tuple[str, dict[str, np.ndarray]]:
            arrays = self.store.read_shard(shard, names)
            self._check(shard, arrays)
            return shard, arrays

        return dict(pool.map(one, shards))

    def _check(self, shard: str, arrays: dict[str, np.ndarray]) -> None:
        """Refuse a shard whose arrays do not fit the store's records (before any of it reaches a step)."""
        rows = {len(a) for a in arrays.values()}
        if len(rows) > 1:
            counts = {k: len(a) for k, a in arrays.items()}
            raise StoreError(
                f"{self.store.url}: shard {shard}: arrays of different lengths {counts}; run `store verify`"
            )
        for (t, p), codec in self.codecs.items():
            key = array_key(t, p, "dense")
            problem = codec_problem(
                codec, arrays[key], arrays.get(scale_key(t, p)), self.dense_shapes[(t, p)]
            )
            if problem:
                raise StoreError(
                    f"{self.store.url}: shard {shard}, {key}: {problem}; run `radio-dist store verify`"
                )

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan
        first = self.start_step * plan.batch_size
        # windows still needed from start_step on, in order (a window whose rows all lie before is skipped)
        bounds = plan.samples.bounds.tolist()
        needed = [
            k
            for k in range(plan.samples.window_of(first), len(plan.windows))
            if bounds[k + 1] > max(bounds[k], first)
        ]
        q: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.cfg.prefetch_windows))
        stop = threading.Event()

        def producer() -> None:
            with ThreadPoolExecutor(self.cfg.read_threads) as pool:
                for k in needed:
                    if stop.is_set():
                        return
                    try:
                        q.put((k, self._load_window(plan.windows[k], pool)))
                    except BaseException as e:  # surface read errors in the consumer
                        q.put(e)
                        return
            q.put(None)

        thread = threading.Thread(target=producer, name="radio-dist-reader", daemon=True)
        thread.start()
        loaded: dict[str, dict[str, np.ndarray]] = {}
        window_of_shard: dict[str, int] = {}
        try:
            for step in range(self.start_step, plan.steps):
                batch_samples = plan.batch(step)
                wait = 0.0
                missing = [s for s in batch_samples if s.shard not in loaded]
                while missing:
                    t0 = time.perf_counter()
                    item = q.get()
                    wait += time.perf_counter() - t0
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        raise StoreError(f"{self.store.url}: reader ran out of shards before the plan's end")
                    k, arrays = item
                    # a window's shards are dropped once every sample of it lies before this step
                    first_now = step * plan.batch_size
                    loaded = {
                        sh: v for sh, v in loaded.items() if bounds[window_of_shard[sh] + 1] > first_now
                    }
                    loaded.update(arrays)
                    window_of_shard.update(dict.fromkeys(arrays, k))
                    missing = [s for s in batch_samples if s.shard not in loaded]
                yield self._assemble(step, batch_samples, loaded, wait)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)

    def _assemble(
        self, step: int, samples: Sequence[Sample], loaded: dict[str, dict[str, np.ndarray]], wait: float
    ) -> Batch:
        p = self.partition_of_step(step)
        if p not in self.partitions:
            raise ValueError(f"step {step}: partition {p!r} is not read by this stream ({self.partitions})")
        # Rows are grouped by shard inside the batch (the batch's membership is the plan's; order within a
        # batch does not matter to a mean loss), so each (shard, array) is one np.take straight into place.
        by_shard: dict[str, list[Sample]] = {}
        for s in samples:
            by_shard.setdefault(s.shard, []).append(s)
        grouped = [s for group in by_shard.values() for s in group]
        ids = [s.id for s in grouped]
        spans = []
        start = 0
        for sh, group in by_shard.items():
            spans.append(
                (sh, np.asarray([s.index for s in group], dtype=np.int64), start, start + len(group))
            )
            start += len(group)

        def gather(name: str) -> np.ndarray:
            out = np.empty((len(grouped), *self.shapes[name]), dtype=self.dtypes.get(name, np.float32))
            for sh, idx, a, b in spans:
                np.take(loaded[sh][name], idx, axis=0, out=out[a:b])
            return out

        images = gather(image_key(p))
        dense = {t: gather(array_key(t, p, "dense")) for t in self.teachers}
        scales = {t: gather(scale_key(t, p)) for t in self.teachers if self.codecs[(t, p)].has_scale}
        summary: dict[str, np.ndarray | None] = {
            t: gather(array_key(t, p, "summary")) if self.summary_keys[(t, p)] else None
            for t in self.teachers
        }
        codecs = {t: self.codecs[(t, p)] for t in self.teachers}
        return Batch(self.plan.epoch, step, ids, images, dense, summary, p, wait, {}, scales, codecs)
