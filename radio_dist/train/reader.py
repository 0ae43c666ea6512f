"""Streaming cached targets out of a feature store into training workers — deterministically and resumably.

The order in which samples are seen is a pure function of (committed shards, epoch, seed, workers, batch size):
``epoch_plan`` permutes the shards, assigns them to workers balancing row counts (each worker reads only its
own shards), and shuffles samples inside windows of ``shuffle_shards`` consecutive shards. A worker's step
``s`` is slice ``s`` of its stream, so a training job that checkpoints "next step = s" resumes by rebuilding
the plan and starting at ``s``: every sample of the epoch is seen exactly once, whatever was killed.
(Ray Data's iterators cannot be resumed after a failure, which is why the plan lives here.)

``ShardStream`` reads a worker's plan ahead on background threads, each row straight from its chunk file into
the batch's buffer, a shuffle window's batches together (``units``: rows next to each other in a chunk file
are one read) — a window's shards opened (on an object store, fetched) ahead of use — and yields one
``Batch`` per step. Every step of an epoch exists on
every worker; a worker whose shards ran out yields empty batches so collective ops stay in lockstep.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from radio_dist.config import StrictModel
from radio_dist.store import FeatureStore, StoreError, array_key, image_key
from radio_dist.store.codecs import TargetCodec
from radio_dist.store.manifest import gc_paused, scale_key
from radio_dist.store.rows import Dest, ShardRowReader
from radio_dist.store.views import LENGTH_BYTES, decode_rows


class ReaderConfig(StrictModel):
    """How training workers read the store."""

    shuffle_shards: int = Field(
        4, ge=1, description="Shards whose samples are shuffled together (the shuffle buffer, in shards)."
    )
    prefetch_windows: int = Field(
        1,
        ge=0,
        description="Windows of shards opened ahead of the one in use (on an object store: fetched ahead).",
    )
    prefetch_batches: int = Field(
        4,
        ge=1,
        description="Batches read into their buffers ahead of the step that trains on them (and at least two "
        "groups read together, below).",
    )
    read_together_mb: int = Field(
        128,
        ge=0,
        description="A shuffle window's batches are read together, up to this many MB of them at once, so rows "
        "that lie next to each other in a chunk file are one read (0: each batch alone). A worker holds up to "
        "three such groups: two being read, one being trained on.",
    )
    read_threads: int = Field(
        4,
        ge=1,
        description="Threads reading batches into their buffers, and shards opened (fetched) at once.",
    )
    requests: int = Field(
        16,
        ge=1,
        description="Chunk requests in flight per shard fetched from an object store (each chunk file is one "
        "request: the store's chunk_bytes sets its size).",
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


@dataclass(frozen=True)
class ViewChoice:
    """One view per image per epoch (``train.views: one``): the rows of a store that caches several views of
    each image (``source.augment.views``) share their manifest ``source``; each epoch keeps one row of each
    such group, drawn from (seed, epoch) — the same on every worker and after any relaunch."""

    groups: np.ndarray  # int64 group of every row of the shards, in their order (shard by shard, row by row)

    @property
    def images(self) -> int:
        return int(self.groups.max()) + 1 if len(self.groups) else 0

    def mask(self, seed: int, epoch: int) -> np.ndarray:
        """The rows trained on in ``epoch``: one per group."""
        n = len(self.groups)
        draw = _rng(seed, epoch, 0x71E35).random(n)
        order = np.lexsort((draw, self.groups))
        first = np.ones(n, bool)
        first[1:] = self.groups[order][1:] != self.groups[order][:-1]
        keep = np.zeros(n, bool)
        keep[order[first]] = True
        return keep


def view_choice(store: FeatureStore, shards: Sequence[ShardRows]) -> ViewChoice:
    """The groups of ``shards``' rows by the image they are a view of (their manifest ``source``)."""
    table = store.manifest(columns=["id", "source", "status"])
    table = table.filter(pc.equal(table.column("status"), "ok"))
    ids = pa.array([i for s in shards for i in s.ids], pa.string())
    where = pc.index_in(ids, value_set=table.column("id").combine_chunks()).to_numpy(zero_copy_only=False)
    if len(where) and np.isnan(where.astype(float)).any():
        raise StoreError(f"{store.url}: a planned row has no manifest row — run `radio-dist store verify`")
    codes = table.column("source").combine_chunks().dictionary_encode().indices.to_numpy()
    groups = codes[where.astype(np.int64)] if len(where) else np.zeros(0, np.int64)
    _, dense = np.unique(groups, return_inverse=True)  # 0..images-1 in source order
    return ViewChoice(dense.astype(np.int64))


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

    def rows(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Samples ``a:b`` as arrays: (positions, shard numbers into ``shard_names``, rows within their shard)."""
        b = min(b, len(self))
        if b <= a:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        self._ensure(a, b)
        pos = self._out[a:b]
        shard = self._rows.shard_of[pos]
        return pos, shard, pos - self._rows.offsets[shard]

    @property
    def shard_names(self) -> list[str]:
        return self._rows.names

    def ids_at(self, positions: np.ndarray) -> list[str]:
        ids = self._rows.ids
        return [ids[p] for p in positions.tolist()]

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
    select: np.ndarray | None = None,
) -> list[WorkerPlan]:
    """The epoch's sample order for every worker (pure; identical on every worker and across restarts).

    ``exclude`` (``(shard, row)`` pairs) leaves out samples an earlier segment of the epoch already trained on:
    a job relaunched with other settings re-plans the rest of the epoch (``radio_dist.train.epochs``);
    ``segment`` > 0 keys that re-plan's shuffles apart from the epoch's first plan. ``select`` (a mask over
    every row of ``shards`` in order) keeps only the rows it marks: one view per image (``ViewChoice``).

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
    if select is not None:
        if select.shape != (len(rows.ids),):
            raise ValueError(f"select has {select.shape} entries, the shards {len(rows.ids)} rows")
        keep = select.astype(bool, copy=True)
    if exclude:
        keep = np.ones(len(rows.ids), bool) if keep is None else keep
        where = {name: j for j, name in enumerate(rows.names)}
        for shard, r in exclude:
            j = where.get(shard)
            if j is not None and 0 <= r < rows.counts[j]:
                keep[rows.offsets[j] + r] = False
    if keep is not None:
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


# groups of steps read at once at least: one group's planning (Python) runs while another's rows are read
AHEAD_GROUPS = 2

Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype)


class _Windows:
    """The shards of a plan's windows, open (row readers) while batches use them: window ``k`` is opened on the
    first request (its shards concurrently), windows ahead of it start opening then, and a window is closed when
    the stream is past it."""

    def __init__(self, stream: ShardStream, pool: ThreadPoolExecutor) -> None:
        self.stream, self.pool = stream, pool
        self.open: dict[int, dict[str, Future[ShardRowReader]]] = {}
        self.lock = threading.Lock()
        self.closed = False

    def start(self, k: int) -> dict[str, Future[ShardRowReader]]:
        with self.lock:
            if self.closed:
                raise RuntimeError("the stream is closed")
            if k not in self.open:
                self.open[k] = {
                    sh: self.pool.submit(self.stream.open_shard, sh) for sh in self.stream.plan.windows[k]
                }
            return self.open[k]

    def rows(self, k: int, shard: str) -> ShardRowReader:
        n = len(self.stream.plan.windows)
        for ahead in range(k + 1, min(n, k + 1 + self.stream.cfg.prefetch_windows)):
            self.start(ahead)
        return self.start(k)[shard].result()

    def release_before(self, k: int) -> None:
        with self.lock:
            gone = [w for w in self.open if w < k]
            futures = [f for w in gone for f in self.open.pop(w).values()]
        _close(futures)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            futures = [f for w in self.open.values() for f in w.values()]
            self.open.clear()
        _close(futures)


def _close(futures: list[Future[ShardRowReader]]) -> None:
    for f in futures:
        if not f.cancel():
            try:
                f.result().close()
            except BaseException:  # noqa: S110 - an open that failed has nothing to close (its error was raised)
                pass


class ShardStream:
    """Iterate one worker's plan from ``start_step`` on, each batch read straight into its buffers ahead of use.

    ``partition_of_step(step) -> partition`` picks which cached partition each step trains on (all workers
    must agree; the training loop derives it from the seed). Only that partition's arrays are read: every row
    of a batch goes from its chunk file into its place in the batch once (``FeatureStore.open_rows``; on an
    object store a window's shards are fetched whole, concurrently, ahead of use). ``alloc(shape, dtype)``
    makes the batch buffers (pinned host memory on CUDA, so the copy to the device is the next and last).
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
        alloc: Alloc | None = None,
    ) -> None:
        self.store = store
        self.plan = plan
        self.teachers = list(teachers)
        self.partitions = list(partitions)
        self.partition_of_step = partition_of_step
        self.cfg = cfg or ReaderConfig()
        self.start_step = start_step
        self.alloc = alloc or _empty
        meta = store.meta()
        self.view_codec = store.view_codec(meta)  # encoded views are decoded in the reading threads
        self.shapes: dict[str, tuple[int, ...]] = {}  # row shape of every array read (for empty batches)
        self.dtypes: dict[str, Any] = {}
        self.summary_keys: dict[tuple[str, str], bool] = {}
        self.codecs: dict[tuple[str, str], TargetCodec] = {}
        self.dense_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        for p in self.partitions:
            px = int(meta.partitions[p])
            self.shapes[image_key(p)] = (px, px, 3)
            self.dtypes[image_key(p)] = np.dtype(np.uint8)
            for t in self.teachers:
                outputs = meta.teachers[t].outputs.get(p)
                if outputs is None:
                    raise StoreError(f"{store.url}: teacher {t!r} has no outputs for partition {p!r}")
                codec = store.codec(t, p, meta)
                self.codecs[(t, p)] = codec
                self.dense_shapes[(t, p)] = tuple(outputs.dense)
                self.shapes[array_key(t, p, "dense")] = codec.code_shape(tuple(outputs.dense))
                self.dtypes[array_key(t, p, "dense")] = np.dtype(codec.code_dtype)
                sshape = codec.scale_shape(tuple(outputs.dense))
                if sshape is not None:
                    self.shapes[scale_key(t, p)] = sshape
                    self.dtypes[scale_key(t, p)] = np.dtype(np.float16)
                self.summary_keys[(t, p)] = bool(outputs.summary)
                if outputs.summary:
                    self.shapes[array_key(t, p, "summary")] = tuple(outputs.summary)
                    self.dtypes[array_key(t, p, "summary")] = np.dtype(np.float32)

    def array_names(self, partitions: Sequence[str]) -> list[str]:
        """The arrays a batch of ``partitions`` reads: views, codes, scales, summaries."""
        names = []
        for p in partitions:
            names.append(image_key(p))
            for t in self.teachers:
                names.append(array_key(t, p, "dense"))
                if self.codecs[(t, p)].has_scale:
                    names.append(scale_key(t, p))
                if self.summary_keys[(t, p)]:
                    names.append(array_key(t, p, "summary"))
        return names

    def open_shard(self, shard: str) -> ShardRowReader:
        """A row reader of the shard's arrays of every partition read, checked against the store's records
        before any of its rows reaches a step."""
        rows = self.store.open_rows(shard, self.array_names(self.partitions), self.cfg.requests)
        views = {image_key(p) for p in self.partitions}
        for name, a in rows.arrays.items():
            if name in views and self.view_codec.encoded:
                if a.dtype != np.uint8 or len(a.shape) != 2 or a.shape[1] < LENGTH_BYTES:
                    rows.close()
                    raise StoreError(
                        f"{self.store.url}: shard {shard}, {name}: {a.dtype} rows of shape {tuple(a.shape[1:])}, "
                        f"but the store's views are {self.view_codec.name}: uint8 rows of 4 + W bytes expected; "
                        "run `radio-dist store verify`"
                    )
            elif a.dtype != self.dtypes[name] or tuple(a.shape[1:]) != self.shapes[name]:
                rows.close()
                raise StoreError(
                    f"{self.store.url}: shard {shard}, {name}: {a.dtype} rows of shape {tuple(a.shape[1:])}, "
                    f"the store's records (codecs, teacher outputs) need {self.dtypes[name]} rows of "
                    f"{self.shapes[name]}; run `radio-dist store verify`"
                )
        return rows

    def units(self) -> list[range]:
        """The steps from ``start_step`` on, cut into the groups that are read together: a group's batches take
        their first sample from one shuffle window and hold at most ``cfg.read_together_mb`` (at least one
        batch each). A window's rows are all read by its batches, so a whole window read together reads most
        chunk files in one request each."""
        plan, bs = self.plan, self.plan.batch_size
        # bytes of a batch at the widest partition read: what a group of steps may hold at most
        widest = max(
            sum(math.prod(self.shapes[n]) * self.dtypes[n].itemsize for n in self.array_names([p]))
            for p in self.partitions
        )
        most = max(1, (self.cfg.read_together_mb << 20) // max(1, widest * bs))
        starts = np.arange(self.start_step, plan.steps, dtype=np.int64) * bs
        # the window of each step's first sample (-1: an empty batch past the worker's last sample)
        window = np.where(
            starts < len(plan.samples), np.searchsorted(plan.samples.bounds, starts, side="right") - 1, -1
        ).tolist()
        groups: list[range] = []
        first = self.start_step
        for k in range(1, len(window) + 1):
            step = self.start_step + k
            if k == len(window) or step - first >= most or window[k] != window[k - 1]:
                groups.append(range(first, step))
                first = step
        return groups

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan
        bounds = plan.samples.bounds
        pool = ThreadPoolExecutor(self.cfg.read_threads, thread_name_prefix="radio-dist-reader")
        # encoded views of a group of steps decode on threads of their own (the decoder lets go of the GIL)
        decoders = (
            ThreadPoolExecutor(self.cfg.read_threads, thread_name_prefix="radio-dist-decode")
            if self.view_codec.encoded
            else None
        )
        # an object store's shards are fetched concurrently; a local shard opens in ~0.3 ms, and more threads
        # opening them only took the interpreter from the thread reading (measured: 19k against 23k samples/s)
        openers = 1 if self.store.is_local else self.cfg.shuffle_shards * (1 + self.cfg.prefetch_windows)
        opener = ThreadPoolExecutor(openers, thread_name_prefix="radio-dist-open")
        windows = _Windows(self, opener)
        pending: deque[tuple[range, Future[list[Batch]]]] = deque()
        it = iter(self.units())

        def fill() -> None:  # groups read ahead until prefetch_batches steps and two groups are on their way
            while len(pending) < AHEAD_GROUPS or sum(len(r) for r, _ in pending) < self.cfg.prefetch_batches:
                steps = next(it, None)
                if steps is None:
                    return
                pending.append((steps, pool.submit(self._read_steps, steps, windows, decoders)))

        try:
            fill()
            while pending:
                t0 = time.perf_counter()
                batches = pending.popleft()[1].result()
                wait = time.perf_counter() - t0
                fill()
                for batch in batches:
                    batch.read_wait_s, wait = wait, 0.0
                    # windows wholly before the oldest batch still being read are done with
                    nxt = (batch.step + 1) * plan.batch_size
                    windows.release_before(
                        plan.samples.window_of(nxt) if nxt < bounds[-1] else len(plan.windows)
                    )
                    yield batch
        finally:
            for _, f in pending:
                f.cancel()
            pool.shutdown(wait=True)
            if decoders is not None:
                decoders.shutdown(wait=True)
            windows.close()
            opener.shutdown(wait=True)

    def _read_steps(
        self, steps: range, windows: _Windows, decoders: ThreadPoolExecutor | None = None
    ) -> list[Batch]:
        """The batches of ``steps``: planned together with numpy, then each array's rows of a shard read for all
        of them at once (``read_batches``); encoded views decoded on ``decoders`` (a batch each) when given,
        else here."""
        plan, bs = self.plan, self.plan.batch_size
        names_of = plan.samples.shard_names
        lo = steps.start * bs
        pos, shard, row = plan.samples.rows(lo, steps.stop * bs)
        n = len(pos)
        k = (
            np.arange(n, dtype=np.int64) // bs
        )  # the step (from the group's first) of each place; sorting keeps it
        # Rows are grouped by shard inside each batch, shards in the order they first appear in it (the batch's
        # membership is the plan's; order within a batch does not matter to a mean loss), so each shard's rows of
        # a batch sit together. Sorting by the first place of each (step, shard) pair keeps the batches in place.
        pair = k * len(names_of) + shard
        _, at_first, which = np.unique(pair, return_index=True, return_inverse=True)
        order = np.lexsort((np.arange(n), at_first[which.reshape(-1)]))
        pos, shard, row = pos[order], shard[order], row[order]
        ids = plan.samples.ids_at(pos)
        parts = []  # the partition of each step, checked
        for step in steps:
            p = self.partition_of_step(step)
            if p not in self.partitions:
                raise ValueError(
                    f"step {step}: partition {p!r} is not read by this stream ({self.partitions})"
                )
            parts.append(p)
        readers: dict[int, ShardRowReader] = {}  # shard number -> its reader
        found, at = np.unique(shard, return_index=True)
        for j, i in zip(found.tolist(), at.tolist(), strict=True):  # a shard's samples lie in one window
            readers[j] = windows.rows(plan.samples.window_of(lo + int(order[i])), names_of[j])
        sizes = [max(0, min(bs, n - i * bs)) for i in range(len(steps))]
        bufs: list[dict[str, np.ndarray]] = [{} for _ in steps]
        for p in dict.fromkeys(parts):
            mine = [i for i, q in enumerate(parts) if q == p]  # this partition's steps, in order
            view = image_key(p)
            for name in self.array_names([p]):
                if name == view and self.view_codec.encoded:
                    # packed encoded rows, as wide as the widest shard's of the group
                    width = max((r.arrays[name].shape[1] for r in readers.values()), default=LENGTH_BYTES)
                    outs = [np.empty((sizes[i], width), np.uint8) for i in mine]
                else:
                    outs = [self.alloc((sizes[i], *self.shapes[name]), self.dtypes[name]) for i in mine]
                for i, out in zip(mine, outs, strict=True):
                    bufs[i][name] = out
            if not n:
                continue
            index = np.full(
                len(steps), -1, np.int64
            )  # step of the group -> its buffer among this partition's
            index[mine] = np.arange(len(mine))
            chosen = np.flatnonzero(index[k] >= 0)  # places (sorted order) in this partition's batches
            by_shard = chosen[np.argsort(shard[chosen], kind="stable")]
            cuts = [0, *(np.flatnonzero(np.diff(shard[by_shard])) + 1).tolist(), len(by_shard)]
            dests = {name: Dest([bufs[i][name] for i in mine]) for name in self.array_names([p])}
            for g in range(len(cuts) - 1):
                sel = by_shard[cuts[g] : cuts[g + 1]]
                if not len(sel):
                    continue
                reader = readers[int(shard[sel[0]])]
                batch, slot = index[k[sel]], sel - k[sel] * bs  # which buffer, which row of it
                for name, dest in dests.items():
                    reader.read_batches(name, row[sel], batch, slot, dest)
        decoded: list[Any] = []
        for i, p in enumerate(parts):
            view = image_key(p)
            if not self.view_codec.encoded:
                decoded.append(bufs[i][view])
                continue
            cut = slice(i * bs, i * bs + sizes[i])
            labels = [
                f"{readers[j].where}, {view} row {r}"
                for j, r in zip(shard[cut].tolist(), row[cut].tolist(), strict=True)
            ]
            out = self.alloc((sizes[i], *self.shapes[view]), np.dtype(np.uint8))
            args = (self.view_codec, bufs[i][view], self.shapes[view][0], out, labels)
            decoded.append(decoders.submit(decode_rows, *args) if decoders else decode_rows(*args))
        batches = []
        for i, (step, p, images) in enumerate(zip(steps, parts, decoded, strict=True)):
            if isinstance(images, Future):
                images = images.result()
            b = bufs[i]
            dense = {t: b[array_key(t, p, "dense")] for t in self.teachers}
            scales = {t: b[scale_key(t, p)] for t in self.teachers if self.codecs[(t, p)].has_scale}
            summary: dict[str, np.ndarray | None] = {
                t: b[array_key(t, p, "summary")] if self.summary_keys[(t, p)] else None for t in self.teachers
            }
            codecs = {t: self.codecs[(t, p)] for t in self.teachers}
            batch_ids = ids[i * bs : i * bs + sizes[i]]
            batches.append(
                Batch(plan.epoch, step, batch_ids, images, dense, summary, p, 0.0, {}, scales, codecs)
            )
        return batches
