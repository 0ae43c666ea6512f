"""Real input files for tests: good photos and every kind of bad or awkward image, made from sample photos.

``make_bad_inputs`` returns ``{file name: "ok" | "error"}`` as decoded with ``min_side=16`` and the given
``max_pixels``, so any test (sources, pipeline, store) can check that each file ends up as the right row.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from radio_dist.sources import SAMPLE_PHOTOS, load_sample_photo
from radio_dist.train.reader import ShardRows

# The tiny timm ViT student the training tests share (a 32-wide, one-block vit_tiny)
TINY_VIT: dict = {
    "name": "vit",
    "kind": "timm",
    "arch": "vit_tiny_patch16_224",
    "overrides": {"embed_dim": 32, "depth": 1, "num_heads": 2},
    "head_hidden": 32,
}


def fake_shards(sizes: list[int]) -> list[ShardRows]:
    """Committed shards ``s000, s001, ...`` with ``sizes`` rows of ids ``id0, id1, ...`` (no store)."""
    out, k = [], 0
    for s, n in enumerate(sizes):
        out.append(ShardRows(f"s{s:03d}", tuple(f"id{k + i}" for i in range(n))))
        k += n
    return out


FIXTURE_MAX_PIXELS = 1_000_000  # pass as max_pixels so that large.png (retina, 1411x1411) is rejected
BOMB_SIDE = 12_000  # bomb.png: 144 MP of one colour, a few hundred KB on disk, over the default 100 MP


def photo(name: str, max_side: int | None = None) -> Image.Image:
    """A sample photo as a PIL image, optionally shrunk so that tests stay fast."""
    im = Image.fromarray(load_sample_photo(name))
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return im


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bytes(width: int, height: int, rows: int | None = None, value: int = 128) -> bytes:
    """A greyscale PNG of one value, compressed row by row so the pixels never exist in memory.

    ``rows`` < height writes only that many rows: a header-only "bomb" that is cheap to make.
    """
    comp, row = zlib.compressobj(), b"\0" + bytes([value]) * width
    idat = b"".join(comp.compress(row) for _ in range(height if rows is None else rows)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@lru_cache(maxsize=2)
def _bomb(side: int) -> bytes:
    return png_bytes(side, side)


def write_bomb_png(path: Path, side: int = BOMB_SIDE) -> Path:
    """A valid, complete PNG of side x side pixels of one colour (~170 KB for 144 MP)."""
    path.write_bytes(_bomb(side))
    return path


def write_good_photos(folder: Path, n: int, max_side: int = 320) -> list[Path]:
    """n distinct real photos, alternating JPEG and PNG; repeats of a photo are shifted so bytes differ."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        name, rnd = SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)], i // len(SAMPLE_PHOTOS)
        im = photo(name, max_side)
        if rnd:
            im = im.crop((rnd, rnd, im.width, im.height))
        path = folder / f"photo_{i:04d}_{name}.{'jpg' if i % 2 == 0 else 'png'}"
        im.save(path, **({"quality": 90} if path.suffix == ".jpg" else {"compress_level": 1}))
        paths.append(path)
    return paths


def make_bad_inputs(folder: Path, max_pixels: int = FIXTURE_MAX_PIXELS) -> dict[str, str]:
    """Write good, awkward and broken inputs into ``folder``; return file name -> expected status."""
    folder.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}

    def save(name: str, im: Image.Image, ok: bool = True, **kw) -> None:
        im.save(folder / name, **kw)
        status[name] = "ok" if ok else "error"

    def write(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)
        status[name] = "error"

    jpeg = io.BytesIO()
    photo("coffee").save(jpeg, "JPEG", quality=90)
    save("good_rgb.jpg", photo("astronaut"), quality=90)
    save("good.png", photo("chelsea"))
    save("grey.png", photo("camera"))  # mode L
    save("cmyk.jpg", photo("rocket").convert("CMYK"), quality=95)
    moon16 = load_sample_photo("moon").astype(np.uint16) * 257  # exact 16-bit version of the 8-bit photo
    save("grey16.png", Image.fromarray(moon16))  # opens as I;16
    rgba = np.dstack([load_sample_photo("astronaut"), np.full((512, 512), 255, np.uint8)])
    rgba[:256, :256, 3] = 0  # fully transparent quadrant: must come out white
    rgba[256:, :256, 3] = 128
    save("rgba.png", Image.fromarray(rgba))
    save("palette.gif", photo("chelsea").quantize(64))
    frames = [photo("coffee", 128), photo("china", 128).resize(photo("coffee", 128).size)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise when displayed
    save("rotated.jpg", photo("chelsea"), exif=exif, quality=90)
    save("tiny.png", photo("astronaut").resize((4, 4)), ok=False)
    retina = photo("retina")
    save("large.png", retina, ok=retina.width * retina.height <= max_pixels, compress_level=1)
    write_bomb_png(folder / "bomb.png")
    status["bomb.png"] = "ok" if BOMB_SIDE**2 <= max_pixels else "error"
    write("corrupt.jpg", b"\xff\xd8" + np.random.default_rng(0).bytes(5000))
    write("truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    write("empty.jpg", b"")
    write("notes.txt", b"not an image: a stray text file that landed in the image folder\n")
    return status
