"""Helpers that build real stores without running a teacher, for tests and benchmarks (as ``zarr.testing``).

``write_random_store`` writes a real Zarr/Parquet store (the same layout, records and bytes as a cached one)
with random targets; ``write_synthetic_store`` is the small-store shorthand the test suite uses;
``DEMO_TEACHERS`` are the shapes of the demo's two teachers (``radio-dist bench ingest``);
``loopback_s3_server`` is the S3-compatible server on loopback the S3 tests and the ``--s3`` benchmarks run on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from radio_dist.phis import Moments, fit_phis
from radio_dist.store import FeatureStore, OutputShapes, ShardWriter, TeacherRecord, array_key, image_key
from radio_dist.store.codecs import Fidelity, get_codec
from radio_dist.store.manifest import scale_key
from radio_dist.store.views import get_view_codec, pack_rows

DEMO_TEACHERS: dict[str, tuple[int, int, int | None]] = {
    "effnet_lite0": (7, 1280, 1280),
    "mobilenet_v2": (7, 1280, 1280),
}


def write_random_store(
    url: str,
    shard_rows: list[int],
    teachers: dict[str, tuple[int, int, int | None]],
    px: int | dict[str, int],
    errors_per_shard: int = 0,
    seed: int = 7,
    codec: str = "fp16",
    storage_options: dict[str, Any] | None = None,
    views_per_image: int = 1,
    view_codec: str = "raw",
) -> dict[str, list[str]]:
    """A real Zarr/Parquet store with random targets (no teacher runs) — same layout and bytes as a cached one.

    ``teachers`` maps name -> (grid, dense_dim, summary_dim | None), the grid at the smallest partition;
    ``px`` is the view size of one partition ``low`` or a mapping partition -> px (each partition's grid
    scales with its size, as a teacher's does); ``codec`` stores every teacher's targets (with their fidelity,
    as a caching job records it); ``storage_options``: fsspec's, for a store on S3; ``views_per_image``: that
    many consecutive rows are views of one image (one ``source``, as ``source.augment.views`` caches them);
    ``view_codec``: how the views are stored (``pipeline.view_codec``: encoded views as packed rows).
    Returns {shard: ok ids in array order}.
    """
    partitions = {"low": px} if isinstance(px, int) else dict(px)
    smallest = min(partitions.values())
    grids = {t: {p: g * s // smallest for p, s in partitions.items()} for t, (g, _, _) in teachers.items()}
    store = FeatureStore(url, storage_options)
    store.init_or_check(
        partitions,
        {
            t: TeacherRecord(
                fingerprint=f"fp-{t}",
                family="synthetic",
                spec={"name": t},
                codecs={p: codec for p in partitions} if codec != "fp16" else {},
            )
            for t in teachers
        },
        view_codec=view_codec,
    )
    views = get_view_codec(view_codec)
    rng = np.random.default_rng(seed)
    for t, (_, dim, sdim) in teachers.items():
        phis = fit_phis(Moments.from_features(rng.standard_normal((max(400, 2 * dim), dim)) * 2 + 1))
        outputs = {
            p: OutputShapes(dense=[grids[t][p], grids[t][p], dim], summary=[sdim] if sdim else None)
            for p in partitions
        }
        store.save_phis(t, phis, 0.8 if sdim else None, outputs, fit_images=400)
    out: dict[str, list[str]] = {}
    k = 0
    for s, n in enumerate(shard_rows):
        ids = [f"img{k + i:07d}" for i in range(n)]
        k += n
        errs = set(ids[:errors_per_shard])
        ok = [i for i in ids if i not in errs]
        rows = [
            {
                "id": i,
                "source": f"synthetic://{i}"
                if views_per_image == 1
                else f"synthetic://image{int(i[3:]) // views_per_image}",
                "view": "" if views_per_image == 1 else f'{{"aug":{int(i[3:]) % views_per_image}}}',
                "status": "error" if i in errs else "ok",
                "error": f"synthetic://{i}: broken" if i in errs else None,
                "width": smallest,
                "height": smallest,
                "mode": "RGB",
                "geometry": "{}",
            }
            for i in ids
        ]
        r = np.random.default_rng(seed * 1000 + s)
        with ShardWriter(store, ids) as w:
            for p, s_px in partitions.items():
                pixels = r.integers(0, 255, (len(ok), s_px, s_px, 3), dtype=np.uint8)
                w.add_array(
                    image_key(p), pack_rows([views.encode(v) for v in pixels]) if views.encoded else pixels
                )
                for t, (_, dim, sdim) in teachers.items():
                    g = grids[t][p]
                    dense = torch.from_numpy(r.standard_normal((len(ok), g, g, dim), dtype=np.float32))
                    codes, scales = get_codec(codec).encode(dense)
                    w.add_array(array_key(t, p, "dense"), codes.numpy())
                    if scales is not None:
                        w.add_array(scale_key(t, p), scales.numpy())
                    decoded = get_codec(codec).decode(codes, scales)
                    w.add_fidelity(t, p, codec, "float", Fidelity.measure(dense, decoded))
                    if sdim:
                        summary = r.standard_normal((len(ok), sdim), dtype=np.float32)
                        w.add_array(array_key(t, p, "summary"), summary)
            w.add_rows(rows)
        assert w.result is not None
        out[w.result.shard] = ok
    return out


def write_synthetic_store(
    url: str,
    shard_rows: list[int],
    teachers: tuple[str, ...] = ("t1", "t2"),
    px: int | dict[str, int] = 32,
    grid: int = 2,
    dim: int = 8,
    errors_per_shard: int = 0,
) -> dict[str, list[str]]:
    """A small store for reader and training-loop tests: ``teachers`` with ``grid`` x ``grid`` x ``dim`` dense
    targets and ``dim`` summaries at the smallest partition. ``px``: the view size of one partition ``low``,
    or partition -> px."""
    return write_random_store(url, shard_rows, {t: (grid, dim, dim) for t in teachers}, px, errors_per_shard)


@contextmanager
def loopback_s3_server(bucket: str, credentials: tuple[str, str] | None = None) -> Iterator[str]:
    """A fresh S3-compatible server (moto's, from the dev extra) on 127.0.0.1 with one empty ``bucket``; yields
    its endpoint and stops it on exit. ``credentials`` (key, secret) create the bucket; default: the AWS_*
    environment. A missing moto is a RuntimeError saying what to install."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise RuntimeError(
            f"an S3 server on loopback needs moto, which is not installed ({e}): pip install -e '.[dev]'"
        ) from None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a log line per request otherwise
    # port 0: the OS picks a free port when the server binds (no race with other processes)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        keys = (
            {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
            if credentials
            else {}
        )
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys).create_bucket(
            Bucket=bucket
        )
        yield endpoint
    finally:
        server.stop()
