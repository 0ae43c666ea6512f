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
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from radio_dist.config import StrictModel
from radio_dist.store import FeatureStore, StoreError, array_key, image_key
from radio_dist.store.codecs import TargetCodec
from radio_dist.store.feature_store import codec_problem
from radio_dist.store.manifest import scale_key


class ReaderConfig(StrictModel):
    """How training workers read the store."""

    shuffle_shards: int = Field(
        4, ge=1, description="Shards whose samples are shuffled together (the shuffle buffer, in shards)."
    )
    prefetch_windows: int = Field(1, ge=0, description="Windows of shards loaded ahead of the one in use.")
    read_threads: int = Field(
        4, ge=1, description="Parallel array reads per window (object stores like many)."
    )


@dataclass(frozen=True)
class ShardRows:
    """The ok rows of one committed shard: ids in shard-array order."""

    shard: str
    ids: tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    shard: str
    index: int
    id: str


def committed_shards(store: FeatureStore) -> list[ShardRows]:
    """Every committed shard with its ok rows (sorted by shard id; error rows never reach training)."""
    table = store.manifest(columns=["id", "shard", "index", "status"])
    by_shard: dict[str, list[tuple[int, str]]] = {}
    for rid, shard, index, status in zip(
        table.column("id").to_pylist(),
        table.column("shard").to_pylist(),
        table.column("index").to_pylist(),
        table.column("status").to_pylist(),
        strict=True,
    ):
        if status == "ok":
            by_shard.setdefault(shard, []).append((int(index), rid))
    out = []
    for shard in sorted(by_shard):
        rows = sorted(by_shard[shard])
        if [i for i, _ in rows] != list(range(len(rows))):
            raise StoreError(
                f"{store.url}: shard {shard} has non-contiguous row indices — run `store verify`"
            )
        out.append(ShardRows(shard, tuple(r for _, r in rows)))
    return out


def shards_digest(shards: Sequence[ShardRows]) -> str:
    """Identity of a training run's data: changes if any shard or row is added or removed."""
    h = hashlib.sha256()
    for s in shards:
        h.update(s.shard.encode())
        h.update(str(len(s.ids)).encode())
    return h.hexdigest()[:16]


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


@dataclass(frozen=True)
class WorkerPlan:
    """One worker's view of one epoch: its shards and its samples in order, cut into ``steps`` batches."""

    epoch: int
    worker: int
    batch_size: int
    steps: int
    windows: tuple[tuple[str, ...], ...]  # shard ids, in read order, grouped into shuffle windows
    samples: tuple[Sample, ...]

    def batch(self, step: int) -> tuple[Sample, ...]:
        return self.samples[step * self.batch_size : (step + 1) * self.batch_size]


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
    """
    if num_workers < 1 or batch_size < 1 or shuffle_shards < 1:
        raise ValueError(
            f"num_workers, batch_size and shuffle_shards must be >= 1, got {num_workers}, {batch_size}, "
            f"{shuffle_shards}"
        )
    seg = (segment,) if segment else ()  # segment 0 keeps the keys every earlier release used
    rows = {
        s.shard: [Sample(s.shard, i, rid) for i, rid in enumerate(s.ids) if (s.shard, i) not in exclude]
        for s in shards
    }
    order = _rng(seed, epoch, *seg, 0xA11).permutation(len(shards))
    assigned: list[list[ShardRows]] = [[] for _ in range(num_workers)]
    load = [0] * num_workers
    for k in order:  # balance rows; ties go to the lowest rank
        shard = shards[int(k)]
        if not rows[shard.shard]:
            continue  # every row of it was trained on earlier in the epoch
        w = min(range(num_workers), key=lambda i: (load[i], i))
        assigned[w].append(shard)
        load[w] += len(rows[shard.shard])
    plans = []
    for w, mine in enumerate(assigned):
        windows = [mine[i : i + shuffle_shards] for i in range(0, len(mine), shuffle_shards)]
        samples: list[Sample] = []
        for j, win in enumerate(windows):
            pool = [r for s in win for r in rows[s.shard]]
            perm = _rng(seed, epoch, *seg, w, j, 0x5EED).permutation(len(pool))
            samples.extend(pool[int(p)] for p in perm)
        plans.append(
            WorkerPlan(
                epoch=epoch,
                worker=w,
                batch_size=batch_size,
                steps=0,
                windows=tuple(tuple(s.shard for s in win) for win in windows),
                samples=tuple(samples),
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
        # windows still needed from start_step on, in order
        needed: list[tuple[str, ...]] = []
        seen: set[str] = set()
        for s in plan.samples[first:]:
            if s.shard not in seen:
                seen.add(s.shard)
                win = next(w for w in plan.windows if s.shard in w)
                if not needed or needed[-1] != win:
                    needed.append(win)
        q: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.cfg.prefetch_windows))
        stop = threading.Event()

        def producer() -> None:
            with ThreadPoolExecutor(self.cfg.read_threads) as pool:
                for win in needed:
                    if stop.is_set():
                        return
                    try:
                        q.put((win, self._load_window(win, pool)))
                    except BaseException as e:  # surface read errors in the consumer
                        q.put(e)
                        return
            q.put(None)

        thread = threading.Thread(target=producer, name="radio-dist-reader", daemon=True)
        thread.start()
        loaded: dict[str, dict[str, np.ndarray]] = {}
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
                    win, arrays = item
                    # a new window replaces the previous one once nothing of it is needed any more
                    rest = {s.shard for s in plan.samples[step * plan.batch_size :]}
                    loaded = {k: v for k, v in loaded.items() if k in rest}
                    loaded.update(arrays)
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
