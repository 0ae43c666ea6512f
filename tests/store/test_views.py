"""View codecs: names, what each keeps of a real photo's view, the packed rows the store holds, damage named."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data as skdata

from radio_dist.sources import canonical_view
from radio_dist.store import StoreError
from radio_dist.store.views import (
    LENGTH_BYTES,
    decode_rows,
    get_view_codec,
    pack_rows,
    packed_views_problem,
    row_bytes,
    views_of,
)


def photo_view(size: int) -> np.ndarray:
    from PIL import Image

    return canonical_view(Image.fromarray(skdata.astronaut()), size, "", "bilinear")[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255**2 / mse) if mse else float("inf")


def test_names():
    assert [get_view_codec(n).name for n in ("raw", "png", "jpeg", "jpeg-75", "webp-90")] == [
        "raw", "png", "jpeg-90", "jpeg-75", "webp-90",
    ]  # fmt: skip
    assert not get_view_codec("raw").encoded and get_view_codec("png").encoded
    for bad in ("gif", "jpeg-0", "jpeg-101", "png-9", "raw-5", "JPEG"):
        with pytest.raises(ValueError, match=f"unknown view codec '{bad}'.*jpeg-90"):
            get_view_codec(bad)


@pytest.mark.parametrize("size", [224, 1152])
def test_each_codec_on_a_real_photo(size):
    view = photo_view(size)
    png, png_bytes = get_view_codec("png").roundtrip(view)
    np.testing.assert_array_equal(png, view)  # lossless
    for name, floor in (("jpeg-90", 33), ("webp-90", 33), ("jpeg-50", 28)):
        pixels, blob = get_view_codec(name).roundtrip(view)
        assert pixels.shape == view.shape and pixels.dtype == np.uint8
        assert psnr(pixels, view) > floor, name
        assert len(blob) < 0.25 * view.nbytes, (name, len(blob))
        # what the teachers get is exactly what decoding the stored bytes gives later
        np.testing.assert_array_equal(get_view_codec(name).decode(blob, size), pixels)
    assert len(png_bytes) < view.nbytes


def test_packed_rows_hold_each_view_and_damage_is_named():
    codec = get_view_codec("jpeg-80")
    views = [photo_view(64), np.zeros((64, 64, 3), np.uint8), photo_view(64)[::-1].copy()]
    pixels, blobs = zip(*(codec.roundtrip(v) for v in views), strict=True)
    rows = pack_rows(list(blobs))
    assert rows.shape == (3, LENGTH_BYTES + max(len(b) for b in blobs)) and rows.dtype == np.uint8
    assert [bytes(row_bytes(r)) for r in rows] == list(blobs)
    np.testing.assert_array_equal(decode_rows(codec, rows, 64), np.stack(pixels))
    np.testing.assert_array_equal(views_of(codec, rows, 64), np.stack(pixels))
    raw = np.stack(views)
    assert views_of(get_view_codec("raw"), raw, 64) is raw
    assert packed_views_problem(codec, rows, 64) is None
    cut = rows.copy()
    cut[1, :LENGTH_BYTES] = np.frombuffer(np.uint32(rows.shape[1]).tobytes(), np.uint8)  # longer than the row
    assert "1 row(s) whose byte length does not fit" in packed_views_problem(codec, cut, 64)
    with pytest.raises(StoreError, match="shard s row 1: the row says"):
        decode_rows(codec, cut, 64, where=["shard s row 0", "shard s row 1", "shard s row 2"])
    garbled = rows.copy()
    garbled[0, LENGTH_BYTES : LENGTH_BYTES + 40] = 7
    assert "does not decode" in packed_views_problem(codec, garbled, 64)
    with pytest.raises(StoreError, match=r"decodes to \(64, 64, 3\), \(32, 32, 3\) expected"):
        decode_rows(codec, rows, 32)
