"""The feature store: Zarr v3 shards + a Parquet manifest + JSON/safetensors metadata under one fsspec root.

``feature_store`` (the root, reads), ``records`` (``store.json`` as typed records), ``manifest`` (names,
ids, the commit schema), ``writer`` (a shard written whole, then committed), ``lock`` (one writer at a
time), ``chunks`` (the Zarr layout, read straight from chunk files), ``verify`` (info and verify), ``gc``
(what interrupted writes left), ``compact`` (manifest parts merged into snapshots), ``preflight`` (an object
store checked before first use).
"""

from radio_dist.store.errors import StoreError, StoreLockedError, StoreMismatchError
from radio_dist.store.feature_store import S3_RETRIES, FeatureStore, StoreConfig
from radio_dist.store.gc import collect_garbage, find_garbage
from radio_dist.store.lock import WriterLock
from radio_dist.store.manifest import MANIFEST_SCHEMA, array_key, image_key, row_checksum, shard_id_for
from radio_dist.store.records import FORMAT, OutputShapes, PhisRecord, StoreMeta, TeacherRecord
from radio_dist.store.verify import store_info, verify_store
from radio_dist.store.writer import ShardResult, ShardWriter

__all__ = [
    "FORMAT",
    "MANIFEST_SCHEMA",
    "S3_RETRIES",
    "FeatureStore",
    "OutputShapes",
    "PhisRecord",
    "ShardResult",
    "ShardWriter",
    "StoreConfig",
    "StoreError",
    "StoreLockedError",
    "StoreMeta",
    "StoreMismatchError",
    "TeacherRecord",
    "collect_garbage",
    "find_garbage",
    "WriterLock",
    "array_key",
    "image_key",
    "row_checksum",
    "shard_id_for",
    "store_info",
    "verify_store",
]
