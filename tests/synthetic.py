"""A small synthetic store, written shard by shard (no teacher runs), for the store and fault tests.

Shards are deterministic in their ids and seed, so a test (or a writer process it kills and starts again)
can write them in any order, any number of times, and compare what the store holds with what was written.
"""

from __future__ import annotations

import json

import numpy as np

from radio_dist.phis import Moments, fit_phis
from radio_dist.store import (
    FeatureStore,
    OutputShapes,
    ShardWriter,
    TeacherRecord,
    array_key,
    image_key,
    row_checksum,
)

TEACHERS = {"t1": TeacherRecord(fingerprint="f" * 32, family="demo", spec={"x": 1})}
PARTS = {"low": 16}


def make_rows(ids: list[str], errors: tuple[str, ...] = ()) -> list[dict]:
    return [
        {
            "id": i,
            "source": f"/data/{i}.jpg",
            "view": "",
            "status": "error" if i in errors else "ok",
            "error": f"/data/{i}.jpg: broken" if i in errors else None,
            "width": 32,
            "height": 24,
            "mode": "RGB",
            "geometry": json.dumps({"low": {"crop": [4, 0, 28, 24], "size": 16}}),
        }
        for i in ids
    ]


def make_arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        image_key("low"): rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
        array_key("t1", "low", "dense"): rng.standard_normal((n, 2, 2, 8)).astype(np.float16),
        array_key("t1", "low", "summary"): rng.standard_normal((n, 8)).astype(np.float32),
    }


def prepared(store: FeatureStore) -> FeatureStore:
    store.init_or_check(PARTS, TEACHERS)
    phis = fit_phis(Moments.from_features(np.random.default_rng(1).standard_normal((500, 8)) * 3 + 1))
    store.save_phis("t1", phis, 0.5, {"low": OutputShapes(dense=[2, 2, 8], summary=[8])}, fit_images=500)
    return store


def write(store: FeatureStore, ids: list[str], errors: tuple[str, ...] = (), seed: int = 0):
    rows = make_rows(ids, errors)
    n_ok = len(ids) - len(errors)
    with ShardWriter(store, ids) as w:
        for k, v in make_arrays(n_ok, seed).items():
            w.add_array(k, v)
        w.add_rows(rows)
    return w.result


def plan(n_shards: int, rows: int = 8, prefix: str = "img") -> list[list[str]]:
    """The ids of ``n_shards`` shards of ``rows`` rows; shard ``s`` is written with seed ``s``."""
    return [[f"{prefix}{s}-{k}" for k in range(rows)] for s in range(n_shards)]


def expected_checksums(shards: list[list[str]]) -> dict[str, str]:
    """id -> checksum of the row as ``write`` (seed = shard number) gives it to the store."""
    out: dict[str, str] = {}
    for s, ids in enumerate(shards):
        arrays = make_arrays(len(ids), seed=s)
        out.update({i: row_checksum(arrays, k) for k, i in enumerate(ids)})
    return out


def write_missing(store: FeatureStore, shards: list[list[str]]) -> int:
    """Write every shard of ``shards`` not yet committed (a resumed job); returns how many were written."""
    done = store.committed_ids()
    n = 0
    for s, ids in enumerate(shards):
        if not done.issuperset(ids):
            write(store, ids, seed=s)
            n += 1
    return n
