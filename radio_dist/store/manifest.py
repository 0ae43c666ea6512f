"""What names what in a store: array keys, shard ids, the manifest's schema and the rows' checksums.

A shard's commit is its manifest part (``manifest/<shard>.parquet``, ``MANIFEST_SCHEMA``): one row per input
(ok or error), naming the shard, the row's index in the shard's arrays and a checksum over the row's slices of
every array. Shard ids are derived from the image ids they hold, so a retried write targets the same shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("view", pa.string()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int32()),  # row in the shard's arrays; -1 for error rows
        ("width", pa.int32()),  # original image size (0 when unknown)
        ("height", pa.int32()),
        ("mode", pa.string()),  # original PIL mode
        ("geometry", pa.string()),  # JSON {partition: {"crop": [x0,y0,x1,y1], "size": px}}
        ("checksum", pa.string()),  # sha256 over the row's slices of every array ("" for error rows)
        ("committed_at", pa.float64()),
    ]
)
ROW_FIELDS = ("id", "source", "view", "status", "error", "width", "height", "mode", "geometry")


def array_key(teacher: str, partition: str, kind: str) -> str:
    return f"{teacher}/{partition}/{kind}"


def scale_key(teacher: str, partition: str) -> str:
    """The scales of a quantized codec, beside ``T/P/dense`` (its codes)."""
    return f"{teacher}/{partition}/dense_scale"


FIDELITY_KEY = (
    b"radio_dist.fidelity"  # manifest part metadata: the fidelity of the shard's targets as written
)


def image_key(partition: str) -> str:
    return f"images/{partition}"


def row_checksum(arrays: dict[str, np.ndarray], i: int) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name][i]).tobytes())
    return h.hexdigest()


def shard_id_for(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:24]


def shard_of_part(path: str) -> str:
    """Shard id of a manifest part path (``.../manifest/<shard>.parquet``)."""
    return path.rsplit("/", 1)[-1][: -len(".parquet")]
