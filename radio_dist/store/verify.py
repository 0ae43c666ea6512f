"""`radio-dist store info` and `store verify`: what a store holds, and whether it is whole."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from radio_dist.store.chunks import array_names, member
from radio_dist.store.codecs import TargetCodec
from radio_dist.store.errors import StoreError
from radio_dist.store.feature_store import FeatureStore, codec_problem
from radio_dist.store.gc import find_garbage
from radio_dist.store.manifest import (
    MANIFEST_SCHEMA,
    SNAPSHOTS,
    array_key,
    image_key,
    row_checksum,
    scale_key,
    shard_of_part,
)
from radio_dist.store.views import LENGTH_BYTES, get_view_codec, packed_views_problem


def shape_only(array: object) -> np.ndarray:
    """An array with a Zarr array's shape and dtype that holds no data (checks of metadata only)."""
    a = array  # typed loosely: zarr's stubs
    return np.broadcast_to(np.zeros((), np.dtype(a.dtype)), tuple(a.shape))  # type: ignore[attr-defined]


def view_bytes(store: FeatureStore, meta: Any, shards: list[str]) -> dict[str, Any]:
    """How views are stored and their bytes per view per partition: raw ``P·P·3``, or (encoded) the row width
    the shards hold — the bytes plus the padding to each shard's longest view — from the metadata of
    ``shards`` alone (no view is read)."""
    codec = store.view_codec(meta)
    out: dict[str, Any] = {"codec": codec.name, "partitions": {}}
    for p, size in meta.partitions.items():
        raw = size * size * 3
        entry: dict[str, Any] = {"raw_bytes": raw, "stored_bytes": float(raw)}
        if codec.encoded and shards:
            stored = n = 0
            for sh in shards:
                with store.open_rows(sh, [image_key(p)]) as rows:
                    shape = rows.arrays[image_key(p)].shape
                stored += shape[0] * shape[1]
                n += shape[0]
            entry["stored_bytes"] = stored / max(n, 1)
        out["partitions"][p] = entry
    return out


def store_info(store: FeatureStore) -> dict[str, Any]:
    """Summary for `radio-dist store info`: rows, teachers, shapes, bytes per image."""
    meta = store.meta()
    view = store.manifest_view(columns=["id", "status", "shard"])
    man = view.table
    status = man.column("status").to_pylist()
    n_ok = sum(s == "ok" for s in status)
    shard_bytes = store.nbytes("shards")
    garbage = find_garbage(store)
    shard_bytes -= sum(store.nbytes(f"shards/{s}") for s in garbage.orphan_shards)  # committed data only
    fidelity = store.fidelity()
    teachers = {}
    for name, t in meta.teachers.items():
        targets = {}
        for p, o in t.outputs.items():
            codec = store.codec(name, p, meta)
            h, w, c = o.dense
            fid = fidelity.get(f"{name}/{p}")
            targets[p] = {
                "codec": codec.name,
                # stored bytes of one image's dense targets (codes + scales), and as a fraction of fp16's
                "dense_bytes_per_image": codec.bytes_per_token(c) * h * w,
                "vs_fp16": codec.bytes_per_token(c) / (2 * c),
                "fidelity": None
                if fid is None or fid[0] != codec.name
                else {"against": fid[1], **fid[2].summary()},
            }
        teachers[name] = {
            "family": t.family,
            "fingerprint": t.fingerprint,
            "outputs": {p: o.model_dump() for p, o in t.outputs.items()},
            "targets": targets,
            "phis_rotation": t.phis.rotation if t.phis else None,
            "phis_alpha": t.phis.alpha if t.phis else None,
            "summary_dispersion": t.summary_dispersion,
        }
    return {
        "url": store.url,
        "format": meta.format,
        "partitions": meta.partitions,
        "view_resample": meta.view_resample,
        "views": view_bytes(store, meta, sorted(view.shards)[:8]),
        "rows": len(status),
        "rows_ok": n_ok,
        "rows_error": len(status) - n_ok,
        "shards": len(view.shards),
        "manifest": {
            "snapshots": len(view.snapshots),
            "parts": len(view.parts),
            "redundant": len(view.redundant),
        },
        "orphan_shards": len(garbage.orphan_shards),
        "temp_files": len(garbage.temp_files),
        "garbage_bytes": garbage.bytes,  # what `radio-dist store gc` would remove
        "teachers": teachers,
        "bytes_shards": shard_bytes,
        "bytes_total": store.nbytes(),
        "bytes_per_image": (shard_bytes / n_ok) if n_ok else 0.0,
    }


def verify_store(store: FeatureStore, check_data: bool = True) -> dict[str, Any]:
    """Check counts, uniqueness, shapes, checksums and PHI-S files; ``ok`` is False on any problem."""
    problems: list[str] = []
    notes: list[str] = []
    meta = store.meta()
    for name, t in meta.teachers.items():
        info = t.phis
        if info is None:
            problems.append(f"teacher {name!r}: no PHI-S parameters recorded")
            continue
        try:
            blob = store.get(info.file)
        except FileNotFoundError:
            problems.append(f"teacher {name!r}: PHI-S file {info.file} is missing")
            continue
        if hashlib.sha256(blob).hexdigest() != info.sha256:
            problems.append(f"teacher {name!r}: PHI-S file {info.file} checksum mismatch")
    expected: dict[str, tuple[int, ...]] = {}
    codecs: dict[
        str, tuple[TargetCodec, tuple[int, ...], str]
    ] = {}  # dense key -> codec, target shape, scales
    try:
        view_codec = store.view_codec(meta)
    except StoreError as e:
        problems.append(str(e))
        view_codec = get_view_codec("raw")
    encoded_views = {image_key(p): size for p, size in meta.partitions.items()} if view_codec.encoded else {}
    for p, size in meta.partitions.items():
        if not view_codec.encoded:
            expected[image_key(p)] = (size, size, 3)
    for name, t in meta.teachers.items():
        for p, shapes in t.outputs.items():
            try:
                codec = store.codec(name, p, meta)
            except StoreError as e:
                problems.append(str(e))
                continue
            dense = tuple(shapes.dense)
            expected[array_key(name, p, "dense")] = codec.code_shape(dense)
            sshape = codec.scale_shape(dense)
            if sshape is not None:
                expected[scale_key(name, p)] = sshape
            codecs[array_key(name, p, "dense")] = (codec, dense, scale_key(name, p))
            if shapes.summary:
                expected[array_key(name, p, "summary")] = tuple(shapes.summary)
    seen: dict[str, str] = {}
    n_rows = checked = 0
    view = store.manifest_view(strict=False)
    problems.extend(view.problems)
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for path, table in view.objects:
        if not MANIFEST_SCHEMA.equals(table.schema, check_metadata=False):
            problems.append(f"manifest object {path}: unexpected schema")
            continue
        rows = table.to_pylist()
        n_rows += len(rows)
        part_shard = None if f"/{SNAPSHOTS}/" in path else shard_of_part(path)
        for r in rows:
            if part_shard is not None and r["shard"] != part_shard:
                problems.append(f"row {r['id']}: shard {r['shard']} recorded in part of shard {part_shard}")
            if r["id"] in seen:
                problems.append(
                    f"image id {r['id']} committed twice (shards {seen[r['id']]} and {r['shard']})"
                )
            seen[r["id"]] = r["shard"]
            by_shard.setdefault(r["shard"] if part_shard is None else part_shard, []).append(r)
    for shard, rows in sorted(by_shard.items()):
        ok_rows = [r for r in rows if r["status"] == "ok"]
        if not ok_rows:
            continue
        try:
            group = store.open_shard(shard)
            names = set(array_names(group))
        except Exception as e:
            problems.append(f"shard {shard}: committed but unreadable ({e})")
            continue
        missing = (set(expected) | set(encoded_views)) - names
        if missing:
            problems.append(f"shard {shard}: missing arrays {sorted(missing)}")
            continue
        bad_views: set[str] = set()  # encoded view arrays of the wrong kind: not decoded below
        for k in sorted(names):
            arr = member(group, k)
            if arr.shape[0] != len(ok_rows):
                problems.append(
                    f"shard {shard}: {k} has {arr.shape[0]} rows, manifest has {len(ok_rows)} ok rows"
                )
            if k in expected and tuple(arr.shape[1:]) != expected[k]:
                problems.append(f"shard {shard}: {k} shape {arr.shape[1:]} != {expected[k]} in store.json")
            if k in encoded_views and (
                arr.dtype != np.uint8 or len(arr.shape) != 2 or arr.shape[1] < LENGTH_BYTES
            ):
                problems.append(
                    f"shard {shard}: {k} is {arr.dtype} {arr.shape}, {view_codec.name} views are uint8 [N, 4 + W]"
                )
                bad_views.add(k)
        arrays: dict[str, np.ndarray] = {}
        if check_data:
            try:  # the reader's own path: a truncated or missing chunk is named with its array
                arrays = store.read_shard(shard, sorted(names))
            except (
                StoreError,
                ValueError,
            ) as e:  # not OSError: a file this user may not read is told as that
                problems.append(f"shard {shard}: {e}")
                continue
        for key, size in encoded_views.items() if check_data else ():  # lengths fit; the first view decodes
            if key in bad_views:
                continue
            problem = packed_views_problem(view_codec, arrays[key], size)
            if problem:
                problems.append(f"shard {shard}: {key}: {problem}")
        for key, (codec, dense, skey) in codecs.items():  # codes and scales fit the codec
            codes = arrays[key] if check_data else shape_only(member(group, key))
            scale = None
            if skey in names:
                scale = arrays[skey] if check_data else shape_only(member(group, skey))
            problem = codec_problem(codec, codes, scale, dense)
            if problem is None and check_data:
                problem = codec.check_codes(codes, scale)
            if problem:
                problems.append(f"shard {shard}: {key}: {problem}")
        if check_data and all(a.shape[0] == len(ok_rows) for a in arrays.values()):
            for r in ok_rows:
                if row_checksum(arrays, r["index"]) != r["checksum"]:
                    problems.append(
                        f"shard {shard}: checksum mismatch for image {r['id']} (row {r['index']})"
                    )
                checked += 1
    garbage = find_garbage(store)
    if not garbage.empty:
        notes.append(
            f"{len(garbage.orphan_shards)} uncommitted shard dir(s), {len(garbage.temp_files)} temporary "
            f"file(s) and {len(garbage.redundant_manifest)} redundant manifest object(s) from interrupted writes "
            f"({garbage.bytes / 1e6:.1f} MB, invisible to readers): "
            f"`radio-dist store gc {store.url}` removes them"
        )
    return {
        "ok": not problems,
        "problems": problems,
        "notes": notes,
        "rows": n_rows,
        "unique_ids": len(seen),
        "shards": len(by_shard),
        "rows_checksummed": checked,
    }
