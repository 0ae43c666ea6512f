"""The caching job's id and decode stages, called as Ray Data calls them (a batch of columns), without Ray."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import radio_dist.cache.stages as stages
from radio_dist.sources import (
    SourceConfig,
    canonical_view,
    decode_image,
    list_items,
    load_sample_photo,
    parse_view,
    read_bytes,
)

PARTITIONS = {"low": 96, "high": 160}


def photo_folder(tmp_path, fmt: str) -> str:
    """Two real photos at a size JPEG draft scaling applies to, and one file that is not an image."""
    folder = tmp_path / fmt
    folder.mkdir()
    for name in ("coffee", "astronaut"):
        im = Image.fromarray(load_sample_photo(name)).resize((1600, 1200))
        im.save(folder / f"{name}.{fmt}", quality=90) if fmt == "jpg" else im.save(folder / f"{name}.{fmt}")
    (folder / "notes.jpg").write_bytes(b"not an image")
    return str(folder)


def batch_of(cfg: SourceConfig) -> dict[str, np.ndarray]:
    items = list_items(cfg)
    return {"uri": np.array([i.uri for i in items]), "view": np.array([i.view for i in items])}


def test_each_file_is_read_and_decoded_once_for_all_its_augmented_views(tmp_path, monkeypatch):
    """source.augment.views = 4: a batch holds each file's four views as four rows; the id and decode stages
    read each file once (read_bytes wrapped to count; it still reads) and decode it once, for the view that
    needs the most pixels. A JPEG's views are then cut from a decode at the draft scale of its smallest crop
    (the same pixels as cutting them from `decode_image` with that draft); a PNG's, which has no draft scaling,
    are the pixels each view decoded alone would give. A file that is not an image fails each of its rows with
    one message; the other files' rows are untouched."""
    reads: list[str] = []
    decodes: list[str] = []

    def counted(uri, storage_options=None):
        reads.append(uri)
        return read_bytes(uri, storage_options)

    def decode_counted(data, uri, *args, **kwargs):
        decodes.append(uri)
        return decode_image(data, uri, *args, **kwargs)

    monkeypatch.setattr(stages, "read_bytes", counted)
    monkeypatch.setattr(stages, "decode_image", decode_counted)
    for fmt in ("jpg", "png"):
        cfg = SourceConfig(kind="folder", path=photo_folder(tmp_path, fmt), augment={"views": 4, "seed": 3})
        batch = batch_of(cfg)
        assert len(batch["uri"]) == 12
        reads.clear()
        ids = stages.IdStage({})(batch)
        assert sorted(reads) == sorted(set(batch["uri"].tolist()))  # three files, each read once
        reads.clear()
        decodes.clear()
        out = stages.DecodeStage(cfg, PARTITIONS)(ids)
        assert sorted(reads) == sorted(set(batch["uri"].tolist()))
        assert sorted(decodes) == sorted(set(batch["uri"].tolist()))  # the bad file's too: once
        bad = np.array(["notes.jpg" in u for u in batch["uri"]])
        assert (out["status"][bad] == "error").all() and len(set(out["error"][bad])) == 1
        assert "not an image" in out["error"][bad][0] and (out["status"][~bad] == "ok").all()
        for uri in set(batch["uri"][~bad].tolist()):
            rows = np.flatnonzero(batch["uri"] == uri)
            views = [str(batch["view"][i]) for i in rows]
            data = read_bytes(uri)
            shared = decode_image(data, uri, draft_for=(stages._smallest_view(views), 160))
            for i, view in zip(rows, views, strict=True):
                alone = decode_image(data, uri, draft_for=(view, 160))
                for p, px in PARTITIONS.items():
                    want = canonical_view(shared.image, px, view, cfg.resample, shared.original_size)[0]
                    np.testing.assert_array_equal(out[stages.column("img", p)][i], want)
                    if fmt == "png":  # no draft scaling: exactly what each view decoded alone gives
                        own = canonical_view(alone.image, px, view, cfg.resample, alone.original_size)[0]
                        np.testing.assert_array_equal(out[stages.column("img", p)][i], own)
                # drafted or not, every view is cut from at least as many pixels as its largest partition
                x0, y0, x1, y1 = parse_view(view) if view else (0.0, 0.0, 1.0, 1.0)
                w, h = shared.image.size
                assert min((x1 - x0) * w, (y1 - y0) * h) >= 160 - 1
            if fmt == "jpg":
                assert shared.image.size[0] < 1600  # drafted: the decode was scaled down


def test_a_file_is_let_go_after_its_last_row(tmp_path):
    """The per-batch cache holds a file's bytes and decoded image only while rows of it remain: a batch of
    large photos (one row each, no augmentation) holds one at a time, as before the cache."""
    folder = photo_folder(tmp_path, "png")
    a, b = f"{folder}/coffee.png", f"{folder}/astronaut.png"
    files = stages._PerFile([a, a, b], {})
    cfg = SourceConfig(kind="folder", path=folder)
    data = files.read(a)
    assert files.image(a, data, cfg, ("", 96)) is files.image(a, files.read(a), cfg, ("", 96))
    files.done(a)
    assert a in files.data and a in files.images  # one row of it left
    files.done(a)
    assert a not in files.data and a not in files.images
    files.read(b)
    files.done(b)
    assert not files.data and not files.images
    missing = stages._PerFile([f"{folder}/gone.png"] * 2, {})
    with pytest.raises(Exception, match="gone.png") as first:
        missing.read(f"{folder}/gone.png")
    with pytest.raises(type(first.value)):  # the same error for each of its rows, read once
        missing.read(f"{folder}/gone.png")
