"""Sources: listing, reading, ids, decoding of good/awkward/broken real images, canonical views."""

from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures import FIXTURE_MAX_PIXELS, make_bad_inputs, photo, png_bytes, write_good_photos
from PIL import Image

from radio_dist.sources import (
    EVAL_PHOTOS,
    SAMPLE_PHOTOS,
    TRAIN_PHOTOS,
    DecodedImage,
    ImageError,
    SourceConfig,
    SourceError,
    SourceItem,
    SourceKind,
    canonical_view,
    decode_image,
    image_id,
    list_items,
    load_sample_photo,
    read_bytes,
)

EXPECTED_MESSAGE = {
    "corrupt.jpg": "not an image (cannot identify image file)",
    "notes.txt": "not an image (cannot identify image file)",
    "truncated.jpg": "truncated",
    "empty.jpg": "empty file (0 bytes)",
    "tiny.png": "image is 4x4 px, smaller than min_side=16",
    "large.png": f"image is 1411x1411 px = 1.99 MP, more than max_pixels={FIXTURE_MAX_PIXELS}",
    "bomb.png": f"image is 12000x12000 px = 144 MP, more than max_pixels={FIXTURE_MAX_PIXELS}",
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad")
    return folder, make_bad_inputs(folder)


def decode(path: Path, **kw) -> DecodedImage:
    return decode_image(read_bytes(str(path)), str(path), **{"max_pixels": FIXTURE_MAX_PIXELS, **kw})


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------- config


def test_config_requires_path_for_folder_and_list_and_forbids_it_for_samples():
    for kind in ("folder", "list"):
        with pytest.raises(ValueError, match=f"kind={kind} needs source.path"):
            SourceConfig(kind=kind)
    with pytest.raises(ValueError, match="takes no path"):
        SourceConfig(kind="sample-photos", path="/data")
    with pytest.raises(ValueError, match="extra"):
        SourceConfig(pathh="/data")
    with pytest.raises(ValueError):
        SourceConfig(views=-1)
    cfg = SourceConfig(kind="folder", path="s3://bucket/prefix", storage_options={"anon": True})
    assert cfg.kind is SourceKind.folder and cfg.min_side == 16 and cfg.max_pixels == 100_000_000
    assert all(f.description for f in SourceConfig.model_fields.values())


def test_everything_a_ray_task_touches_pickles(bad):
    folder, _ = bad
    cfg = SourceConfig(kind="folder", path=str(folder), limit=3)
    item = SourceItem("sample-photos:moon#view=20", '{"x0":0,"x1":1,"y0":0,"y1":0.5}')
    dec = decode(folder / "grey.png")
    err = ImageError("/x.jpg: truncated")
    for obj in (cfg, item, SourceError("p: gone"), err):
        assert pickle.loads(pickle.dumps(obj)) == obj or str(pickle.loads(pickle.dumps(obj))) == str(obj)
    back = pickle.loads(pickle.dumps(dec))
    assert back.mode == "L" and np.array_equal(back.rgb, dec.rgb)


# ---------------------------------------------------------------- bad and awkward inputs


def test_every_fixture_file_gets_its_expected_status_and_errors_name_the_file(bad):
    folder, status = bad
    assert set(EXPECTED_MESSAGE) <= {n for n, s in status.items() if s == "error"}
    assert sum(s == "ok" for s in status.values()) >= 9
    for name, expected in status.items():
        path = folder / name
        if expected == "ok":
            dec = decode(path)
            assert dec.rgb.dtype == np.uint8 and dec.rgb.ndim == 3 and dec.rgb.shape[2] == 3, name
            assert (dec.height, dec.width) == dec.rgb.shape[:2]
        else:
            with pytest.raises(ImageError) as info:
                decode(path)
            msg = str(info.value)
            assert msg.startswith(f"{path}: "), msg
            assert EXPECTED_MESSAGE[name] in msg, msg


def test_bomb_is_rejected_at_default_limit_from_the_header_without_leaking_warnings(bad):
    folder, status = bad
    path = folder / "bomb.png"
    assert path.stat().st_size < 2_000_000 and status["bomb.png"] == "error"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match=r"12000x12000 px = 144 MP, more than max_pixels=100000000"):
            decode_image(path.read_bytes(), str(path))
    assert caught == []
    # The status map follows max_pixels: with a generous limit the "large" photo is fine.
    assert make_bad_inputs(folder / "again", max_pixels=3_000_000)["large.png"] == "ok"
    assert decode(folder / "large.png", max_pixels=3_000_000).rgb.shape == (1411, 1411, 3)


def test_pil_decompression_bomb_error_becomes_image_error(monkeypatch):
    data = png_bytes(20_000, 20_000, rows=4)  # 400 MP header, beyond PIL's own hard limit
    with pytest.raises(ImageError, match=r"^big\.png: image has 400 MP, more than max_pixels=100000000"):
        decode_image(data, "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    with pytest.raises(ImageError, match=r"20000x20000 px = 400 MP, more than max_pixels=300000000"):
        decode_image(data, "big.png", max_pixels=300_000_000)


def test_truncated_png_and_garbage_behind_a_jpeg_marker_are_image_errors():
    buf = io.BytesIO()
    photo("astronaut").save(buf, "PNG")
    with pytest.raises(ImageError, match=r"^cut\.png: truncated"):
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2], "cut.png")
    with pytest.raises(ImageError, match=r"^x\.jpg: "):
        decode_image(b"\xff\xd8\xff\xe0" + b"\x00" * 40, "x.jpg")


def test_sixteen_bit_greyscale_is_scaled_not_clipped(bad):
    folder, _ = bad
    dec = decode(folder / "grey16.png")
    assert dec.mode.startswith("I")
    moon = load_sample_photo("moon")
    assert np.abs(dec.rgb[..., 0].astype(int) - moon).max() <= 1
    assert dec.rgb.max() > 200  # clipping 16-bit values to 255 would make the photo almost all white
    assert diff(dec.rgb[..., 0], np.full_like(moon, 255)) > 50


def test_greyscale_is_replicated_to_three_equal_channels(bad):
    folder, _ = bad
    dec = decode(folder / "grey.png")
    assert dec.mode == "L"
    assert np.array_equal(dec.rgb[..., 0], load_sample_photo("camera"))
    assert (dec.rgb == dec.rgb[..., :1]).all()  # all three channels equal


def test_rgba_is_composited_over_white(bad):
    folder, _ = bad
    dec = decode(folder / "rgba.png")
    src = load_sample_photo("astronaut").astype(int)
    assert dec.mode == "RGBA"
    assert (dec.rgb[:256, :256] == 255).all()  # fully transparent -> white
    assert np.array_equal(dec.rgb[:, 256:], src[:, 256:])  # opaque -> unchanged
    half = dec.rgb[256:, :256].astype(int)
    assert np.abs(half - (src[256:, :256] * 128 + 255 * 127) / 255).max() <= 1


def test_cmyk_palette_animated_and_exif_rotation_convert_to_the_right_pixels(bad):
    folder, _ = bad
    cmyk = decode(folder / "cmyk.jpg")
    assert cmyk.mode == "CMYK" and diff(cmyk.rgb, load_sample_photo("rocket")) < 6
    pal = decode(folder / "palette.gif")
    assert pal.mode == "P" and diff(pal.rgb, load_sample_photo("chelsea")) < 12
    anim = decode(folder / "animated.gif")  # first frame is coffee, the second china
    coffee, china = np.asarray(photo("coffee", 128)), np.asarray(photo("china", 128).resize((128, 85)))
    assert diff(anim.rgb, coffee) < 12 < diff(anim.rgb, china)
    rot = decode(folder / "rotated.jpg")  # stored 451x300 with EXIF orientation 6
    chelsea = load_sample_photo("chelsea")
    assert (rot.width, rot.height) == (300, 451)
    assert diff(rot.rgb, np.rot90(chelsea, k=-1)) < 6 < diff(rot.rgb, np.rot90(chelsea, k=1))


# ---------------------------------------------------------------- listing


def test_folder_listing_is_sorted_recursive_skips_hidden_keeps_non_images(tmp_path):
    write_good_photos(tmp_path / "sub", 3)
    (tmp_path / "b.jpg").write_bytes(read_bytes(str(tmp_path / "sub" / "photo_0000_astronaut.jpg")))
    (tmp_path / "a.txt").write_text("stray")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    uris = [i.uri for i in list_items(SourceConfig(kind="folder", path=str(tmp_path)))]
    assert uris == sorted(uris) and len(uris) == 5
    assert str(tmp_path / "a.txt") in uris and not any("/." in u for u in uris)
    flat = list_items(SourceConfig(kind="folder", path=str(tmp_path), recursive=False))
    assert [i.uri for i in flat] == [str(tmp_path / "a.txt"), str(tmp_path / "b.jpg")]
    assert [i.uri for i in list_items(SourceConfig(kind="folder", path=str(tmp_path), limit=2))] == uris[:2]


def test_folder_on_an_fsspec_url_lists_and_reads_through_fsspec():
    fs = fsspec.filesystem("memory")
    fs.pipe("/srcs-test/imgs/a.png", b"A")
    fs.pipe("/srcs-test/imgs/deep/b.png", b"B")
    items = list_items(SourceConfig(kind="folder", path="memory://srcs-test/imgs"))
    assert len(items) == 2 and all(i.uri.startswith("memory://") for i in items)
    assert [read_bytes(i.uri) for i in items] == [b"A", b"B"]


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_list_file_resolves_relative_paths_against_its_folder(tmp_path, fmt):
    photos = write_good_photos(tmp_path / "imgs", 2)
    other = tmp_path / "elsewhere.jpg"
    other.write_bytes(photos[0].read_bytes())
    rows = [
        "../imgs/" + photos[0].name,
        "../imgs/" + photos[1].name,
        str(other),
        "sample-photos:moon",
        "../imgs/" + photos[0].name,
    ]
    (tmp_path / "lists").mkdir()
    path = tmp_path / "lists" / f"l.{fmt}"
    table = pa.table({"file": rows, "label": list(range(len(rows)))})
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        path.write_text("label,file\n" + "".join(f"{i},{r}\n" for i, r in enumerate(rows)))
    items = list_items(SourceConfig(kind="list", path=str(path), column="file"))
    expected = [str(photos[0]), str(photos[1]), str(other), "sample-photos:moon"]
    assert [i.uri for i in items] == sorted(expected)
    assert all(read_bytes(i.uri) for i in items)
    with pytest.raises(SourceError, match=rf"{path}: no column 'uri' \(columns: .*file.*\)"):
        list_items(SourceConfig(kind="list", path=str(path)))


def test_unusable_sources_raise_source_error_naming_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SourceError, match=rf"{missing}: folder does not exist"):
        list_items(SourceConfig(kind="folder", path=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden").write_text("x")
    with pytest.raises(SourceError, match=rf"{empty}: folder has no \(non-hidden\) files"):
        list_items(SourceConfig(kind="folder", path=str(empty)))
    afile = tmp_path / "list.csv"
    afile.write_text("uri\n")
    with pytest.raises(SourceError, match=rf"{afile} is a file, not a folder"):
        list_items(SourceConfig(kind="folder", path=str(afile)))
    with pytest.raises(SourceError, match=rf"{afile}: column 'uri' lists no URIs"):
        list_items(SourceConfig(kind="list", path=str(afile)))
    with pytest.raises(SourceError, match=rf"{missing}.csv: list file does not exist"):
        list_items(SourceConfig(kind="list", path=f"{missing}.csv"))
    json_list = tmp_path / "list.json"
    json_list.write_text("[]")
    with pytest.raises(SourceError, match="unsupported list format"):
        list_items(SourceConfig(kind="list", path=str(json_list)))
    with pytest.raises(SourceError, match="unknown sample photo 'unicorn'"):
        load_sample_photo("unicorn")


def test_read_bytes_failures_are_image_errors_naming_the_uri(tmp_path):
    for uri, what in [
        (str(tmp_path / "gone.jpg"), "file not found"),
        (str(tmp_path), "is a directory"),
        ("sample-photos:unicorn", "unknown sample photo"),
    ]:
        with pytest.raises(ImageError, match="^" + uri + ": ") as info:
            read_bytes(uri)
        assert what in str(info.value)


# ---------------------------------------------------------------- ids


def test_ids_follow_content_and_view_not_path(tmp_path):
    (a, b) = write_good_photos(tmp_path, 2)
    copy = tmp_path / "copy" / "same.jpg"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    ida = image_id(read_bytes(str(a)))
    assert ida == image_id(read_bytes(str(copy))) != image_id(read_bytes(str(b)))
    assert len(ida) == 32 and int(ida, 16) >= 0
    v1, v2 = '{"x0":0,"x1":0.5,"y0":0,"y1":0.5}', '{"x0":0.5,"x1":1,"y0":0.5,"y1":1}'
    assert len({ida, image_id(a.read_bytes(), v1), image_id(a.read_bytes(), v2)}) == 3


def test_sample_photo_bytes_and_ids_are_stable_and_uncompressed():
    first = {n: image_id(read_bytes(f"sample-photos:{n}")) for n in SAMPLE_PHOTOS}
    again = {n: image_id(read_bytes(f"sample-photos:{n}")) for n in reversed(SAMPLE_PHOTOS)}
    assert first == again and len(set(first.values())) == len(SAMPLE_PHOTOS)
    assert read_bytes("sample-photos:astronaut").startswith(b"P6\n512 512\n255\n")
    assert read_bytes("sample-photos:camera").startswith(b"P5\n512 512\n255\n")
    assert read_bytes("sample-photos:camera#view=20") == read_bytes("sample-photos:camera")
    dec = decode_image(read_bytes("sample-photos:chelsea"), "sample-photos:chelsea")
    assert np.array_equal(dec.rgb, load_sample_photo("chelsea"))


# ---------------------------------------------------------------- sample photos


def test_every_sample_photo_loads_offline_with_greyscale_ones_included():
    assert {"astronaut", "camera", "moon", "china", "flower", "grace_hopper"} <= set(SAMPLE_PHOTOS)
    for name in SAMPLE_PHOTOS:
        img = load_sample_photo(name)
        assert img.dtype == np.uint8 and min(img.shape[:2]) >= 256 and img.std() > 10, name
        assert img.ndim == (2 if name in ("camera", "moon") else 3), name
    items = list_items(SourceConfig())
    assert [i.uri for i in items] == [f"sample-photos:{n}" for n in TRAIN_PHOTOS]
    assert all(i.view == "" for i in items)


def test_the_eval_photos_are_kept_out_of_the_default_source():
    # a default store never holds a view of the eval photos: `radio-dist eval` scores on whole unseen photos
    train, held = set(TRAIN_PHOTOS), set(EVAL_PHOTOS)
    assert train | held == set(SAMPLE_PHOTOS) and not train & held and len(held) == 3
    for views in (0, 64, 200):
        assert {i.photo.split(":")[1] for i in list_items(SourceConfig(views=views))} == train
        assert {i.photo.split(":")[1] for i in list_items(SourceConfig(views=views, photos="eval"))} == held
    assert len(list_items(SourceConfig(photos="all"))) == len(SAMPLE_PHOTOS)
    with pytest.raises(ValueError, match="source.photos.*sample-photos"):
        SourceConfig(kind="folder", path="/x", photos="eval")


def test_views_expand_into_n_distinct_stable_items():
    n, p = 40, len(TRAIN_PHOTOS)
    items = list_items(SourceConfig(views=n))
    assert len(items) == n and items == list_items(SourceConfig(views=n))
    assert all(i.view == "" for i in items[:p]) and all(i.view for i in items[p:])
    assert items[p].uri == f"sample-photos:{TRAIN_PHOTOS[0]}#view={p}"
    ids = {image_id(read_bytes(i.uri), i.view) for i in items}
    assert len(ids) == n
    for item in items[p:]:
        box = json.loads(item.view)
        assert 0 <= box["x0"] < box["x1"] <= 1 and 0 <= box["y0"] < box["y1"] <= 1
        h, w = load_sample_photo(item.uri.split(":")[1].split("#")[0]).shape[:2]
        cw, ch = (box["x1"] - box["x0"]) * w, (box["y1"] - box["y0"]) * h
        assert 0.35 * min(w, h) * 0.85 <= max(cw, ch) and 0.7 <= cw / ch <= 1.4
    assert list_items(SourceConfig(views=n, limit=5)) == items[:5]


# ---------------------------------------------------------------- canonical view


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize("shape", [(300, 451), (600, 512), (512, 512)])
def test_canonical_view_is_a_centred_square_inside_the_image(shape, resample):
    h, w = shape
    rgb = np.asarray(Image.fromarray(load_sample_photo("coffee")).resize((w, h)))
    out, geom = canonical_view(rgb, 224, resample=resample)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and geom["size"] == 224
    x0, y0, x1, y1 = geom["crop"]
    assert x1 - x0 == pytest.approx(y1 - y0) == pytest.approx(min(h, w))
    assert 0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h
    # bilinear keeps whole pixels: the square is centred to within half a pixel
    tol = 0.5 if resample == "bilinear" else 1e-6
    assert abs((x0 + x1) / 2 - w / 2) <= tol and abs((y0 + y1) / 2 - h / 2) <= tol


@pytest.mark.parametrize(
    ("resample", "pil_filter"),
    [("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC)],
)
def test_view_crop_changes_output_and_geometry_lies_inside_the_view(resample, pil_filter):
    """Both resamplings give the crop PIL's own filter of that name gives (torch's antialiased uint8
    bilinear kernel follows PIL's), and the recorded square is the one resampled."""
    rgb = load_sample_photo("astronaut")
    whole, _ = canonical_view(rgb, 128, resample=resample)
    view = '{"x0":0.5,"x1":1.0,"y0":0.25,"y1":0.75}'
    part, geom = canonical_view(rgb, 128, view, resample)
    assert diff(whole, part) > 10
    assert geom["crop"] == pytest.approx([256.0, 128.0, 512.0, 384.0])
    direct = np.asarray(Image.fromarray(rgb[128:384, 256:512]).resize((128, 128), pil_filter))
    assert diff(part, direct) < 2
    other = "bicubic" if resample == "bilinear" else "bilinear"
    assert 0 < diff(part, canonical_view(rgb, 128, view, other)[0]) < 10  # two filters, one picture
    grey, _ = canonical_view(load_sample_photo("camera"), 64)
    assert grey.shape == (64, 64, 3)
    with pytest.raises(ImageError, match="invalid view"):
        canonical_view(rgb, 64, '{"x0":0.6,"x1":0.5,"y0":0,"y1":1}')
    with pytest.raises(ImageError, match="invalid view"):
        canonical_view(rgb, 64, "not json")


def test_decoded_photo_resamples_to_the_same_views_as_its_pixels():
    """The decode stage hands the PIL image to canonical_view (no numpy round trip): same pixels out,
    and the image stays usable after decode_image returns (it is not closed)."""
    data = read_bytes("sample-photos:chelsea")
    dec = decode_image(data, "sample-photos:chelsea")
    assert isinstance(dec.image, Image.Image) and dec.image.mode == "RGB"
    pixels = dec.rgb
    assert np.array_equal(pixels, load_sample_photo("chelsea"))
    for view in ("", '{"x0":0.1,"x1":0.9,"y0":0.0,"y1":0.7}'):
        from_image, geo_image = canonical_view(dec.image, 96, view)
        from_pixels, geo_pixels = canonical_view(pixels, 96, view)
        assert np.array_equal(from_image, from_pixels) and geo_image == geo_pixels
    grey = decode_image(read_bytes("sample-photos:camera"), "sample-photos:camera")
    assert grey.mode == "L" and grey.image.mode == "RGB"
    assert np.array_equal(
        canonical_view(grey.image, 64)[0], canonical_view(load_sample_photo("camera"), 64)[0]
    )


# ---------------------------------------------------------------- drafted JPEG decode


def same_square_from_full_decode(full, view_px: np.ndarray, geo: dict, resample: str) -> float:
    """Mean |difference| between ``view_px`` and the full decode's view of the square ``geo`` records: the
    recorded square is the one resampled, up to the JPEG decoder's own downscaling."""
    w, h = full.original_size
    x0, y0, x1, y1 = geo["crop"]
    square = json.dumps({"x0": x0 / w, "x1": x1 / w, "y0": y0 / h, "y1": y1 / h})
    ref, geo_ref = canonical_view(full.image, geo["size"], square, resample, full.original_size)
    assert geo_ref["crop"] == pytest.approx(geo["crop"], abs=1e-3)
    return diff(ref, view_px)


def _big_jpeg(w: int = 2000, h: int = 1500, orientation: int | None = None) -> bytes:
    im = Image.fromarray(load_sample_photo("astronaut")).resize((w, h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if orientation is None:
        im.save(buf, "JPEG", quality=92)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(buf, "JPEG", quality=92, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    ("view", "decoded"), [("", (500, 375)), ('{"x0":0.5,"x1":1.0,"y0":0.25,"y1":0.75}', (1000, 750))]
)
def test_a_large_jpeg_is_decoded_at_the_scale_its_views_need(view, decoded, resample):
    """A 2000x1500 JPEG for 224 px views decodes at 1/4 (a whole view: 375 px short side) or 1/2 (a half
    crop: its 750 px side becomes 375); the sizes and the recorded square are the original's, and the
    view is the one the full decode gives, up to the decoder's own downscaling."""
    data = _big_jpeg()
    full = decode_image(data, "big.jpg")
    small = decode_image(data, "big.jpg", draft_for=(view, 224))
    assert full.image.size == (2000, 1500) and small.image.size == decoded
    assert full.original_size == small.original_size == (2000, 1500)
    a, geo_a = canonical_view(full.image, 224, view, resample, full.original_size)
    b, geo_b = canonical_view(small.image, 224, view, resample, small.original_size)
    # bilinear crops whole pixels of the drafted image: the square moves by up to 2 original pixels
    assert geo_b["crop"] == pytest.approx(geo_a["crop"], abs=2.5)
    assert same_square_from_full_decode(full, b, geo_b, resample) < 1.0
    assert diff(a, canonical_view(full.image, 224, '{"x0":0,"x1":0.5,"y0":0,"y1":0.5}')[0]) > 10


def test_a_drafted_jpeg_with_an_exif_quarter_turn_keeps_its_upright_size():
    data = _big_jpeg(orientation=6)  # stored 2000x1500, shown 1500x2000
    full = decode_image(data, "rot.jpg")
    small = decode_image(data, "rot.jpg", draft_for=("", 224))
    assert full.original_size == small.original_size == (1500, 2000)
    assert full.image.size == (1500, 2000) and small.image.size == (375, 500)
    _, geo_a = canonical_view(full.image, 224, "", "bilinear", full.original_size)
    b, geo_b = canonical_view(small.image, 224, "", "bilinear", small.original_size)
    assert geo_a["crop"] == [0.0, 250.0, 1500.0, 1750.0]
    assert geo_b["crop"] == pytest.approx(geo_a["crop"], abs=2.5)
    assert same_square_from_full_decode(full, b, geo_b, "bilinear") < 1.0


def test_draft_leaves_small_jpegs_and_other_formats_alone():
    png = io.BytesIO()
    Image.fromarray(load_sample_photo("astronaut")).save(png, "PNG")
    assert decode_image(png.getvalue(), "a.png", draft_for=("", 16)).image.size == (512, 512)
    jpg = _big_jpeg(600, 440)  # a 224 px view needs more than half of 440 px: no draft
    assert decode_image(jpg, "a.jpg", draft_for=("", 224)).image.size == (600, 440)
    # just enough: half of 450 px is 225
    assert decode_image(_big_jpeg(600, 450), "b.jpg", draft_for=("", 224)).image.size == (300, 225)


def test_augmented_views_are_listed_per_image_and_cut_with_their_flip():
    """source.augment.views: K rows per image — the whole image, then seeded square crops, some mirrored —
    the same list on every call, another with another seed; the geometry records crop and flip."""
    from PIL import Image

    from radio_dist.sources import AugmentConfig, augment_view, view_flip

    cfg = SourceConfig(limit=3, augment={"views": 4, "flip": 0.5, "seed": 1})
    items = list_items(cfg)
    assert len(items) == 12 and [it.uri for it in items] == [
        u for u in dict.fromkeys(i.uri for i in items) for _ in range(4)
    ]
    assert [it.view for it in items[::4]] == ["", "", ""]  # view 0: the whole image
    assert items == list_items(cfg) and items != list_items(
        cfg.model_copy(update={"augment": AugmentConfig(views=4, seed=2)})
    )
    views = [it.view for it in items if it.view]
    assert len(set(views)) == 9 and any(view_flip(v) for v in views) and not all(view_flip(v) for v in views)
    img = Image.fromarray(load_sample_photo("astronaut"))
    for k in range(1, 40):
        v = augment_view(AugmentConfig(views=40, flip=0.5), "x", k)
        px, geo = canonical_view(img, 48, v)
        side = geo["crop"][2] - geo["crop"][0]
        assert 0.35 * 512 - 1 <= side <= 512 and geo["crop"][3] - geo["crop"][1] == side
        if view_flip(v):  # the mirror of the same crop unflipped
            plain = json.dumps({key: val for key, val in json.loads(v).items() if key != "flip"})
            np.testing.assert_array_equal(px, canonical_view(img, 48, plain)[0][:, ::-1])
            assert geo["flip"] is True
    with pytest.raises(ValueError, match="do not combine"):
        SourceConfig(views=20, augment={"views": 2})
