"""The caching pipeline's stages: what runs inside Ray Data tasks and actors, one batch at a time.

1. ``IdStage`` (tasks): read each input once, hash its content -> stable image id; unreadable inputs become
   error rows.
2. ``DecodeStage`` (tasks): read + decode + one canonical square view per partition; bad input -> error row.
3. ``TeacherStage`` (one actor pool per teacher): model loaded once per actor, inference mode; dense targets
   PHI-S-normalized and encoded in the actor (the job's codec per partition: fp16, int8 or nf4 codes + scales),
   with the fidelity of each image's codes to its float targets measured there; summaries kept raw.
4. ``WriteStage`` (tasks): ``shard_size`` rows -> one immutable Zarr shard + its manifest part (the commit).

``NormalizeStage`` and ``moments_stage`` serve the one-time PHI-S fit sample. A teacher actor imports this
module, the store, the sources and the teacher registry: nothing of training.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, TypeVar, cast

import numpy as np
import torch

from radio_dist.phis import Moments, PhiS
from radio_dist.sources import (
    DecodedImage,
    ImageError,
    SourceConfig,
    canonical_view,
    decode_image,
    image_id,
    parse_view,
    read_bytes,
)
from radio_dist.store import FeatureStore, ShardWriter, StoreConfig, array_key, image_key
from radio_dist.store.codecs import NBINS, Fidelity, TargetCodec, get_codec
from radio_dist.store.manifest import scale_key
from radio_dist.store.views import get_view_codec, pack_rows
from radio_dist.teacher import TeacherSpec, create_teacher


def actor_threads(spec: TeacherSpec) -> int:
    """torch threads of a teacher's actor: ``runtime.threads``, default its Ray CPUs (at least one)."""
    return spec.runtime.threads or max(1, round(spec.runtime.num_cpus))


def teacher_partitions(spec: TeacherSpec, partitions: dict[str, int]) -> list[str]:
    """The partitions a teacher runs on (its ``only_partitions``, in the job's order)."""
    return [p for p in partitions if spec.only_partitions is None or p in spec.only_partitions]


def teacher_device(spec: TeacherSpec) -> str:
    """Where a teacher's actor runs it: CUDA only with ``runtime.num_gpus > 0`` and a GPU visible."""
    return "cuda" if spec.runtime.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def column(kind: str, *parts: str) -> str:
    """A pipeline column: ``img__P``, ``dense__T__P``, ``summary__T__P``, ``fwin__T__P``, ``fwimg__T`` ..."""
    return "__".join((kind, *parts))


def unreadable_id(uri: str) -> str:
    """Ids for inputs whose bytes cannot be read live in their own namespace (hash of the uri)."""
    return "u" + image_id(uri.encode(), "unreadable")[1:]


T = TypeVar("T")


class _PerFile:
    """A batch's files, each read (and decoded) once for all its rows — ``source.augment`` makes K rows of a
    file, one after another — and let go of after its last row (``done``), so a batch of large photos never
    holds more than its files in flight. An error is raised again for each of the file's rows."""

    def __init__(self, uris: list[str], storage_options: dict[str, Any]) -> None:
        self.left = Counter(uris)
        self.storage_options = storage_options
        self.data: dict[str, bytes | Exception] = {}
        self.images: dict[str, DecodedImage | Exception] = {}

    def read(self, uri: str) -> bytes:
        if uri not in self.data:
            try:
                self.data[uri] = read_bytes(uri, self.storage_options)
            except Exception as e:
                self.data[uri] = e
        return _or_raise(self.data[uri])

    def image(self, uri: str, data: bytes, source: SourceConfig, draft_for: tuple[str, int]) -> DecodedImage:
        if uri not in self.images:
            try:
                self.images[uri] = decode_image(data, uri, source.min_side, source.max_pixels, draft_for)
            except Exception as e:
                self.images[uri] = e
        return _or_raise(self.images[uri])

    def done(self, uri: str) -> None:
        self.left[uri] -= 1
        if self.left[uri] <= 0:
            self.data.pop(uri, None)
            self.images.pop(uri, None)


def _or_raise(got: T | Exception) -> T:
    if isinstance(got, Exception):
        raise got
    return got


def _smallest_view(views: list[str]) -> str:
    """The view whose crop has the shortest side (as a fraction of the image's shorter side): decoding a file
    once for all its views (JPEG draft scaling) must keep enough pixels for that one. Invalid views are
    skipped (their rows fail on their own)."""
    best, side = "", 2.0
    for v in views:
        try:
            x0, y0, x1, y1 = parse_view(v) if v else (0.0, 0.0, 1.0, 1.0)
        except ImageError:
            continue
        if min(x1 - x0, y1 - y0) < side:
            best, side = v, min(x1 - x0, y1 - y0)
    return best


class IdStage:
    def __init__(self, storage_options: dict[str, Any]) -> None:
        self.storage_options = storage_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, errors = [], []
        files = _PerFile([str(u) for u in batch["uri"]], self.storage_options)
        for uri, view in zip(batch["uri"], batch["view"], strict=True):
            try:
                ids.append(image_id(files.read(str(uri)), str(view)))
                errors.append("")
            except ImageError as e:
                ids.append(unreadable_id(str(uri)))
                errors.append(str(e))
            except Exception as e:  # a reader bug must not kill the run: record it on the row
                ids.append(unreadable_id(str(uri)))
                errors.append(f"{uri}: unexpected {type(e).__name__} while reading: {e}")
            finally:
                files.done(str(uri))
        return {"uri": batch["uri"], "view": batch["view"], "id": np.array(ids), "error": np.array(errors)}


class DecodeStage:
    """Task UDF: ids -> decoded images -> canonical views per partition. With an encoded ``view_codec`` each
    view is encoded and decoded again: the teachers get the decoded pixels, the writer the bytes."""

    def __init__(self, source: SourceConfig, partitions: dict[str, int], view_codec: str = "raw") -> None:
        self.source = source
        self.partitions = partitions
        self.view_codec = get_view_codec(view_codec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["id"])
        out: dict[str, Any] = {k: batch[k] for k in ("id", "uri", "view")}
        status, error, width, height, mode, geometry = [], [], [], [], [], []
        images = {p: np.zeros((n, s, s, 3), np.uint8) for p, s in self.partitions.items()}
        encoded: dict[str, list[bytes]] = {p: [b""] * n for p in self.partitions}
        # each file read and decoded once for all its rows (augmented views): decoded (JPEG: draft-scaled) for
        # the view that needs the most pixels, so every other view of it is cut from at least as many
        views_of: dict[str, list[str]] = {}
        for uri, view, err in zip(batch["uri"], batch["view"], batch["error"], strict=True):
            if not str(err):
                views_of.setdefault(str(uri), []).append(str(view))
        files = _PerFile([u for u, vs in views_of.items() for _ in vs], self.source.storage_options)
        px = max(self.partitions.values())
        for i in range(n):
            uri, view, iid, err = (
                str(batch["uri"][i]),
                str(batch["view"][i]),
                str(batch["id"][i]),
                str(batch["error"][i]),
            )
            w = h = 0
            m = ""
            geo: dict[str, Any] = {}
            if not err:
                try:
                    data = files.read(uri)
                    if image_id(data, view) != iid:
                        raise ImageError(
                            f"{uri}: content changed while caching (id mismatch); re-run the job"
                        )
                    img = files.image(uri, data, self.source, (_smallest_view(views_of[uri]), px))
                    w, h, m = img.width, img.height, img.mode
                    for p, size in self.partitions.items():
                        images[p][i], geo[p] = canonical_view(
                            img.image, size, view, self.source.resample, img.original_size
                        )
                        if self.view_codec.encoded:
                            images[p][i], encoded[p][i] = self.view_codec.roundtrip(images[p][i])
                except ImageError as e:
                    err = str(e)
                except Exception as e:  # a decoder bug must not kill the run: record it on the row
                    err = f"{uri}: unexpected {type(e).__name__} while decoding: {e}"
                finally:
                    files.done(uri)
            status.append("error" if err else "ok")
            error.append(err)
            width.append(w)
            height.append(h)
            mode.append(m)
            geometry.append(json.dumps(geo))
        out.update(
            status=np.array(status),
            error=np.array(error),
            width=np.array(width, np.int32),
            height=np.array(height, np.int32),
            mode=np.array(mode),
            geometry=np.array(geometry),
        )
        for p in self.partitions:
            out[column("img", p)] = images[p]
            if self.view_codec.encoded:
                out[column("imgenc", p)] = np.array(encoded[p], dtype=object)
        return out


FIDELITY_WIDTH = 4 + NBINS  # Fidelity.to_vector()


def encoded_columns(
    phis: PhiS, codec: TargetCodec, dense: torch.Tensor, ok: np.ndarray, row_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The stored columns of one teacher and partition for a batch of ``len(ok)`` rows: (codes, scales or None,
    fidelity [n, FIDELITY_WIDTH]). ``dense`` holds the raw features of the ok rows; they are taken to PHI-S space,
    encoded by ``codec``, and each image's decoded targets measured against its float PHI-S targets. Error rows
    get zeros of the same shapes (Ray Data columns have one shape)."""
    n = len(ok)
    codes_out = np.zeros((n, *codec.code_shape(row_shape)), codec.code_dtype)
    sshape = codec.scale_shape(row_shape)
    scale_out = np.zeros((n, *sshape), np.float16) if sshape is not None else None
    fid_out = np.zeros((n, FIDELITY_WIDTH))
    if ok.any():
        y = cast(torch.Tensor, phis.forward(dense))
        codes, scale = codec.encode(y)
        fid_out[ok] = Fidelity.per_image(y, codec.decode(codes, scale))
        codes_out[ok] = codes.cpu().numpy()
        if scale_out is not None and scale is not None:
            scale_out[ok] = scale.cpu().numpy()
    return codes_out, scale_out, fid_out


def put_encoded(batch: dict[str, Any], teacher: str, partition: str, cols: tuple[Any, ...]) -> None:
    codes, scale, fid = cols
    batch[column("dense", teacher, partition)] = codes
    batch[column("fid", teacher, partition)] = fid
    if scale is not None:
        batch[column("dscale", teacher, partition)] = scale


class TeacherStage:
    """Actor UDF: one teacher, loaded once; adds its dense (+ summary) columns for every partition."""

    def __init__(
        self,
        spec: TeacherSpec,
        partitions: dict[str, int],
        store: StoreConfig | None,
        codecs: dict[str, str] | None = None,
    ) -> None:
        """``store`` given: normalize with the store's PHI-S (read here, not shipped through Ray) and encode with
        ``codecs`` (partition -> codec name, default fp16)."""
        self.threads = actor_threads(spec)
        torch.set_num_threads(self.threads)
        self.teacher = create_teacher(spec, teacher_device(spec))
        self.spec = spec
        self.partitions = teacher_partitions(spec, partitions)
        self.sizes = partitions
        self.phis = FeatureStore.from_config(store).phis(spec.name) if store is not None else None
        self.codecs = {p: get_codec((codecs or {}).get(p, "fp16")) for p in self.partitions}
        # Output shapes per partition from one probe forward (not counted), so an all-error batch still
        # yields columns of the right shape and dtype.
        self.shapes: dict[str, tuple[tuple[int, ...], int | None]] = {}
        for p in self.partitions:
            s = self.sizes[p]
            out = self.teacher(
                np.zeros((1, s, s, 3), np.uint8), resolution=self.teacher.input_resolution(p, s)
            )
            self.shapes[p] = (
                tuple(out.dense.shape[1:]),
                None if out.summary is None else out.summary.shape[1],
            )
            self.codecs[p].check_dim(int(out.dense.shape[-1]), f"teacher {spec.name!r}, partition {p!r}")
        self.teacher.forward_images = self.teacher.forward_calls = self.teacher.model_inputs = 0

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        # Ray Data may call the UDF from another thread than __init__; OpenMP's thread count is per thread,
        # so without this the forward ran with one OpenMP thread per core in every actor (oversubscribed).
        torch.set_num_threads(self.threads)
        ok = np.asarray(batch["status"]) == "ok"
        n = len(ok)
        name = self.spec.name
        before_i, before_c = self.teacher.forward_images, self.teacher.forward_calls
        for p in self.partitions:
            dshape, sdim = self.shapes[p]
            summ_out = np.zeros((n, sdim), np.float32) if sdim is not None else None
            inputs_before = self.teacher.model_inputs
            dense = torch.zeros((0, *dshape))
            if ok.any():
                res = self.teacher.input_resolution(p, self.sizes[p])
                out = self.teacher(np.asarray(batch[column("img", p)])[ok], resolution=res)
                dense = out.dense
                if summ_out is not None and out.summary is not None:
                    summ_out[ok] = out.summary.cpu().numpy()
            if self.phis is not None:  # stored targets
                put_encoded(batch, name, p, encoded_columns(self.phis, self.codecs[p], dense, ok, dshape))
            else:  # the PHI-S fit sample: raw features, normalized and encoded once PHI-S is fitted
                raw = np.zeros((n, *dshape), np.float32)
                raw[ok] = dense.cpu().numpy()
                batch[column("dense", name, p)] = raw
            if summ_out is not None:
                batch[column("summary", name, p)] = summ_out
            fw_inputs = np.zeros(n, np.int64)
            fw_inputs[0] = self.teacher.model_inputs - inputs_before
            batch[column("fwin", name, p)] = fw_inputs
        fw_img = np.zeros(n, np.int64)
        fw_calls = np.zeros(n, np.int64)
        fw_img[0] = self.teacher.forward_images - before_i
        fw_calls[0] = self.teacher.forward_calls - before_c
        batch[column("fwimg", name)] = fw_img
        batch[column("fwcalls", name)] = fw_calls
        return batch


class NormalizeStage:
    """PHI-S-normalize and encode raw dense columns (only used for the fit sample, which ran unnormalized)."""

    def __init__(self, phis: dict[str, PhiS], codecs: dict[str, dict[str, str]]) -> None:
        """``codecs``: teacher -> partition -> codec name."""
        self.phis = phis
        self.codecs = codecs

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ok = np.asarray(batch["status"]) == "ok"
        for key in list(batch):
            if key.startswith("dense__"):
                _, teacher, p = key.split("__")
                raw = np.asarray(batch[key], np.float32)
                codec = get_codec(self.codecs[teacher][p])
                cols = encoded_columns(
                    self.phis[teacher], codec, torch.from_numpy(raw[ok]), ok, raw.shape[1:]
                )
                put_encoded(batch, teacher, p, cols)
        return batch


def moments_stage(batch: dict[str, Any]) -> dict[str, Any]:
    """Per-batch float64 moments of every teacher's raw dense features (all partitions pooled)."""
    ok = np.asarray(batch["status"]) == "ok"
    out: dict[str, Any] = {}
    per_teacher: dict[str, Moments] = {}
    for key in batch:
        if key.startswith("dense__"):
            teacher = key.split("__")[1]
            dense = np.asarray(batch[key])
            # an all-error batch still reports (empty) moments so every batch has the same columns
            m = Moments.from_features(dense[ok]) if ok.any() else Moments.empty(dense.shape[-1])
            per_teacher[teacher] = per_teacher[teacher].merge(m) if teacher in per_teacher else m
    for teacher, m in per_teacher.items():
        for k, v in m.to_arrays().items():
            out[f"{teacher}__{k}"] = np.asarray(v)[None]
    return out


class WriteStage:
    """Task UDF: a batch of ``shard_size`` rows becomes one committed shard; returns one stats row."""

    def __init__(
        self,
        store: StoreConfig,
        teachers: list[str],
        partitions: list[str],
        codecs: dict[str, dict[str, str]],
        view_codec: str = "raw",
    ) -> None:
        """``codecs``: teacher -> partition -> codec name (recorded with each shard's fidelity);
        ``view_codec``: encoded views are written as their bytes (``radio_dist.store.views``)."""
        self.store = FeatureStore.from_config(store)
        self.view_codec = get_view_codec(view_codec)
        self.chunk_bytes = store.chunk_bytes
        self.teachers = teachers
        self.partitions = partitions
        self.codecs = codecs

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        status = np.asarray(batch["status"])
        ok = status == "ok"
        rows = [
            {
                "id": str(batch["id"][i]),
                "source": str(batch["uri"][i]),
                "view": str(batch["view"][i]),
                "status": str(status[i]),
                "error": str(batch["error"][i]) or None,
                "width": int(batch["width"][i]),
                "height": int(batch["height"][i]),
                "mode": str(batch["mode"][i]),
                "geometry": str(batch["geometry"][i]),
            }
            for i in range(len(status))
        ]
        with ShardWriter(self.store, [str(r["id"]) for r in rows], self.chunk_bytes) as w:
            if ok.any():
                for p in self.partitions:
                    if self.view_codec.encoded:
                        blobs = [bytes(b) for b, k in zip(batch[column("imgenc", p)], ok, strict=True) if k]
                        w.add_array(image_key(p), pack_rows(blobs))
                    else:
                        w.add_array(image_key(p), np.asarray(batch[column("img", p)])[ok])
                for t in self.teachers:
                    for p in self.partitions:
                        for kind in ("dense", "summary"):
                            col = column(kind, t, p)
                            if col in batch:
                                w.add_array(array_key(t, p, kind), np.asarray(batch[col])[ok])
                        if column("dscale", t, p) in batch:
                            w.add_array(scale_key(t, p), np.asarray(batch[column("dscale", t, p)])[ok])
                        if column("fid", t, p) in batch:
                            vec = np.asarray(batch[column("fid", t, p)])[ok].sum(axis=0)
                            w.add_fidelity(t, p, self.codecs[t][p], "float", Fidelity.from_vector(vec))
            w.add_rows(rows)
        res = w.result
        assert res is not None
        stats: dict[str, Any] = {
            "shard": np.array([res.shard]),
            "n_ok": np.array([res.n_ok]),
            "n_error": np.array([res.n_error]),
            "nbytes": np.array([res.nbytes]),
            "skipped": np.array([res.skipped]),
            "errors": np.array([json.dumps([(r["source"], r["error"]) for r in rows if r["error"]][:5])]),
        }
        for t in self.teachers:
            stats[column("fwimg", t)] = np.array([int(np.asarray(batch[column("fwimg", t)]).sum())])
            stats[column("fwcalls", t)] = np.array([int(np.asarray(batch[column("fwcalls", t)]).sum())])
            for p in self.partitions:  # only the partitions this teacher runs on have the column
                if column("fwin", t, p) in batch:
                    stats[column("fwin", t, p)] = np.array(
                        [int(np.asarray(batch[column("fwin", t, p)]).sum())]
                    )
        return stats
