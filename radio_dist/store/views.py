"""Canonical views as the store holds them: raw pixels, or encoded (JPEG / WebP at a quality, lossless PNG).

A 1152 px view is 4 MB of raw uint8 — as much as a teacher's quantized targets — so a caching job can store
its views encoded (``pipeline.view_codec``: ``raw``, ``png``, ``jpeg-Q``, ``webp-Q``; recorded in ``store.json``
as ``view_codec``). The caching job encodes each canonical view, **decodes it again, and gives the teachers
the decoded pixels**: the targets belong to exactly the pixels a student will decode from the store later.

An encoded view is one row of a uint8 array ``images/P`` of shape ``[N, 4 + W]``: the byte length (uint32,
little-endian), the encoded bytes, zeros up to the shard's longest view. Rows stay rows, so the row reader,
row checksums, verify and recode treat them as any other array; the training reader decodes them in its
threads (``decode_rows``) into the uint8 ``[n, P, P, 3]`` views everything downstream takes.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from radio_dist.store.errors import StoreError

LENGTH_BYTES = 4  # the uint32 byte count that opens every encoded row
_NAME = re.compile(r"^(raw|png|jpeg|webp)(?:-(\d{1,3}))?$")


@dataclass(frozen=True)
class ViewCodec:
    """How views are stored: ``raw`` (uint8 pixels), ``png`` (lossless), ``jpeg-Q`` / ``webp-Q`` (quality Q)."""

    name: str
    format: str
    quality: int | None

    @property
    def encoded(self) -> bool:
        return self.format != "raw"

    def encode(self, view: np.ndarray) -> bytes:
        """The bytes of one uint8 ``[P, P, 3]`` view."""
        buf = io.BytesIO()
        img = Image.fromarray(np.ascontiguousarray(view), "RGB")
        if self.format == "png":
            img.save(buf, "PNG", compress_level=6)
        elif self.format == "jpeg":
            img.save(buf, "JPEG", quality=self.quality, subsampling=0 if (self.quality or 0) >= 95 else 2)
        else:
            img.save(buf, "WEBP", quality=self.quality, method=4)
        return buf.getvalue()

    def decode(self, data: bytes | memoryview, size: int, where: str = "view") -> np.ndarray:
        """The uint8 ``[size, size, 3]`` pixels of one encoded view (``where`` names it in an error)."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = img if img.mode == "RGB" else img.convert("RGB")
                out = np.asarray(rgb)
        except Exception as e:  # a damaged view: name it
            raise StoreError(f"{where}: the stored {self.name} view does not decode ({e})") from e
        if out.shape != (size, size, 3):
            raise StoreError(f"{where}: the stored view decodes to {out.shape}, ({size}, {size}, 3) expected")
        return out

    def roundtrip(self, view: np.ndarray) -> tuple[np.ndarray, bytes]:
        """(the pixels a student will decode, the bytes to store) of one view."""
        data = self.encode(view)
        return self.decode(data, view.shape[0]), data


def get_view_codec(name: str) -> ViewCodec:
    """``raw``, ``png``, ``jpeg[-Q]`` or ``webp[-Q]`` (Q in 1..100, default 90); anything else raises."""
    m = _NAME.match(str(name))
    quality = int(m.group(2)) if m and m.group(2) else None
    bad_quality = quality is not None and (
        m is None or m.group(1) in ("raw", "png") or not 1 <= quality <= 100
    )
    if m is None or bad_quality:
        raise ValueError(
            f"unknown view codec {name!r}: use raw, png (lossless), jpeg-Q or webp-Q with a quality Q in 1..100 "
            "(e.g. jpeg-90)"
        )
    fmt = m.group(1)
    if fmt in ("jpeg", "webp"):
        quality = quality or 90
        return ViewCodec(f"{fmt}-{quality}", fmt, quality)
    return ViewCodec(fmt, fmt, None)


def pack_rows(blobs: Sequence[bytes]) -> np.ndarray:
    """Encoded views as rows of one uint8 array ``[N, 4 + W]`` (length, bytes, zero padding)."""
    width = LENGTH_BYTES + max((len(b) for b in blobs), default=0)
    out = np.zeros((len(blobs), width), np.uint8)
    for i, b in enumerate(blobs):
        out[i, :LENGTH_BYTES] = np.frombuffer(np.uint32(len(b)).astype("<u4").tobytes(), np.uint8)
        out[i, LENGTH_BYTES : LENGTH_BYTES + len(b)] = np.frombuffer(b, np.uint8)
    return out


def row_bytes(row: np.ndarray, where: str = "view") -> memoryview:
    """The encoded bytes of one packed row."""
    if row.ndim != 1 or row.dtype != np.uint8 or len(row) < LENGTH_BYTES:
        raise StoreError(f"{where}: an encoded view row must be uint8 [4 + W], got {row.dtype} {row.shape}")
    n = int(row[:LENGTH_BYTES].view("<u4")[0])
    if n > len(row) - LENGTH_BYTES:
        raise StoreError(f"{where}: the row says {n} bytes, it holds {len(row) - LENGTH_BYTES}")
    return np.ascontiguousarray(row).data[LENGTH_BYTES : LENGTH_BYTES + n]


def decode_rows(
    codec: ViewCodec,
    rows: np.ndarray,
    size: int,
    out: np.ndarray | None = None,
    where: str | Sequence[str] = "views",
) -> np.ndarray:
    """Packed rows ``[n, 4 + W]`` decoded into uint8 ``[n, size, size, 3]`` (into ``out`` when given);
    ``where`` names the rows in an error (one name for all, ``row i`` added, or one per row)."""
    if out is None:
        out = np.empty((len(rows), size, size, 3), np.uint8)
    for i, row in enumerate(rows):
        name = f"{where} row {i}" if isinstance(where, str) else where[i]
        out[i] = codec.decode(row_bytes(row, name), size, name)
    return out


def views_of(codec: ViewCodec, stored: np.ndarray, size: int, where: str = "views") -> np.ndarray:
    """uint8 ``[n, size, size, 3]`` views from an array of stored rows, raw or encoded."""
    return decode_rows(codec, stored, size, where=where) if codec.encoded else stored


def packed_views_problem(codec: ViewCodec, rows: np.ndarray, size: int) -> str | None:
    """What is wrong with a shard's packed views (every row's length fits its row; the first decodes), or None.
    (Decoding every view would cost more than reading it: ``store audit`` runs teachers on decoded views.)"""
    if len(rows) == 0:
        return None
    lengths = np.ascontiguousarray(rows[:, :LENGTH_BYTES]).view("<u4")[:, 0]
    bad = np.flatnonzero((lengths == 0) | (lengths > rows.shape[1] - LENGTH_BYTES))
    if len(bad):
        return f"{len(bad)} row(s) whose byte length does not fit the row (first: row {int(bad[0])})"
    try:
        codec.decode(row_bytes(rows[0]), size, "row 0")
    except StoreError as e:
        return str(e)
    return None
