"""Image sources: list inputs, read their bytes, give them stable ids, decode them, cut canonical views.

Everything here runs inside Ray Data tasks, so it is pure, picklable and fails only through two
exceptions: ``SourceError`` (the whole source is unusable: stop before any work) and ``ImageError`` (one
input is bad: the pipeline records an error row and carries on). Ids hash the *bytes*, so the same picture
found at two paths is cached once, and a re-run recognises what is already in the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import re
import warnings
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field, model_validator

from radio_dist.config import StrictModel

SAMPLE_PREFIX = "sample-photos:"
# Real photos that ship inside installed packages and load without a network (checked by the tests).
_SKIMAGE = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "stereo_motorcycle",
    "retina",
    "immunohistochemistry",
    "camera",
    "moon",
)
_SKLEARN = ("china", "flower")
_MATPLOTLIB = ("grace_hopper",)
SAMPLE_PHOTOS: tuple[str, ...] = _SKIMAGE + _SKLEARN + _MATPLOTLIB
# Whole photos the sample-photos source keeps out of its stores by default (`photos: train`), so that
# `radio-dist eval` scores students on photos none of them saw: a portrait, a landscape, a close-up.
EVAL_PHOTOS: tuple[str, ...] = ("coffee", "china", "grace_hopper")
TRAIN_PHOTOS: tuple[str, ...] = tuple(n for n in SAMPLE_PHOTOS if n not in EVAL_PHOTOS)


class SamplePhotos(str, Enum):
    train = "train"
    eval = "eval"
    all = "all"


SAMPLE_SETS = {
    SamplePhotos.train: TRAIN_PHOTOS,
    SamplePhotos.eval: EVAL_PHOTOS,
    SamplePhotos.all: SAMPLE_PHOTOS,
}


class SourceKind(str, Enum):
    folder = "folder"
    list = "list"
    sample_photos = "sample-photos"


class Resample(str, Enum):
    """How a canonical view is resampled from its crop (both antialiased when shrinking)."""

    bilinear = "bilinear"  # triangle filter, torch's uint8 kernel: ~5x faster than PIL's bicubic
    bicubic = "bicubic"  # PIL's bicubic (a = -0.5) on the exact fractional crop box


class SourceError(ValueError):
    """The source as a whole is unusable; the message names the path and what to do."""


class ImageError(ValueError):
    """One input is bad; the message starts with its uri. The pipeline turns it into an error row."""


class AugmentConfig(StrictModel):
    """Augmented views cached once: each image becomes ``views`` rows, each with its own teachers' targets."""

    views: int = Field(
        1,
        ge=1,
        le=64,
        description="Views per image: the whole image, then views-1 seeded random square crops (flipped at "
        "random); each is one row with its own targets and its geometry recorded. 1 = the whole image only.",
    )
    min_scale: float = Field(
        0.35, gt=0, le=1, description="Smallest crop side, as a fraction of the image's shorter side."
    )
    flip: float = Field(0.5, ge=0, le=1, description="Chance that a crop is mirrored left to right.")
    seed: int = Field(
        0, description="Seed of the crops (drawn from the seed, the image's uri and view number)."
    )


class SourceConfig(StrictModel):
    """Where the images come from and which of them are acceptable."""

    kind: SourceKind = Field(SourceKind.sample_photos, description="folder | list | sample-photos")
    path: str | None = Field(
        None,
        description="kind=folder: a local directory or fsspec URL (s3://bucket/prefix); "
        "kind=list: a .parquet or .csv file (local or fsspec URL) listing the images",
    )
    column: str = Field(
        "uri",
        description="kind=list: column holding the URIs; relative paths are "
        "resolved against the list file's folder",
    )
    recursive: bool = Field(True, description="kind=folder: also list files in sub-folders")
    views: int = Field(
        0,
        ge=0,
        description="kind=sample-photos: expand the photos into this many distinct "
        "deterministic views (whole photos first, then random crops); 0 = each photo once",
    )
    photos: SamplePhotos = Field(
        SamplePhotos.train,
        description=f"kind=sample-photos: train ({len(TRAIN_PHOTOS)} photos), eval (the {len(EVAL_PHOTOS)} kept out of "
        f"train: {', '.join(EVAL_PHOTOS)} — `radio-dist eval` scores on them) or all",
    )
    limit: int | None = Field(None, ge=1, description="take only the first N items (after sorting)")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="K views per image cached once (random resized crops and flips; the trainer takes one "
        "view per image per epoch with train.views: one)",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="passed to fsspec, e.g. {'client_kwargs': {'endpoint_url': ...}}"
    )
    resample: Resample = Field(
        Resample.bilinear,
        description="canonical-view resampling: bilinear (antialiased, torch's uint8 kernel; 1.8 ms per 224 px "
        "view of the sample photos on one core) or bicubic (PIL, 3.6 ms); recorded in the store, which refuses "
        "a job with the other",
    )
    min_side: int = Field(16, ge=1, description="images whose shorter side is below this become error rows")
    max_pixels: int = Field(
        100_000_000,
        ge=1,
        description="images with more pixels than this become error "
        "rows (checked from the header, before decoding: decompression bombs)",
    )

    @model_validator(mode="after")
    def _path_matches_kind(self) -> SourceConfig:
        if self.kind in (SourceKind.folder, SourceKind.list) and not self.path:
            what = (
                "a folder (local or s3://bucket/prefix)"
                if self.kind is SourceKind.folder
                else "a .parquet or .csv list file"
            )
            raise ValueError(f"source.kind={self.kind.value} needs source.path: set it to {what}")
        if self.kind is SourceKind.sample_photos and self.views and self.augment.views > 1:
            raise ValueError(
                "source.views (crops of the sample photos as separate images) and source.augment.views (views "
                "of each image) do not combine: set one of them"
            )
        if self.kind is not SourceKind.sample_photos and self.photos is not SamplePhotos.train:
            raise ValueError(
                "source.photos chooses among the sample photos: it needs source.kind=sample-photos"
            )
        if self.kind is SourceKind.sample_photos and self.path:
            raise ValueError(
                "source.kind=sample-photos takes no path: remove source.path, or set "
                "source.kind=folder / list to read your own images"
            )
        return self


@dataclass(frozen=True)
class SourceItem:
    """One input: what the manifest records as its source, and the crop (if any) applied to it."""

    uri: str
    view: str = ""  # canonical JSON {"x0","y0","x1","y1"} as fractions of width/height, "" = whole image

    @property
    def photo(self) -> str:
        """The photo this item is a view of (see :func:`photo_of`)."""
        return photo_of(self.uri)


def photo_of(uri: str) -> str:
    """The photo a source uri is a view of: sample-photo views share the photo's uri before ``#view=``; other
    sources' uris are the file itself (their views, ``source.augment``, keep the uri)."""
    return uri.split("#view=", 1)[0]


@dataclass
class DecodedImage:
    """A decoded input: its RGB pixels as a PIL image (what resampling reads), as numpy on demand."""

    image: Image.Image  # mode RGB, EXIF orientation applied; smaller than width x height when drafted
    mode: str  # original PIL mode
    width: int  # the original's size, after EXIF orientation
    height: int

    @property
    def original_size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def rgb(self) -> np.ndarray:
        """uint8 [H, W, 3] (a copy of the pixels)."""
        return np.asarray(self.image, dtype=np.uint8)


# ---------------------------------------------------------------- sample photos


def _load_photo_uncached(name: str) -> np.ndarray:
    if name in _SKIMAGE:
        import skimage.data

        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
    elif name in _SKLEARN:
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        from matplotlib import cbook

        with Image.open(cbook.get_sample_data(f"{name}.jpg", asfileobj=False)) as im:
            img = np.asarray(im.convert("RGB"))
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim == 3 and img.shape[2] != 3:
        img = np.ascontiguousarray(img[..., :3])
    return img


@cache
def _sample_pnm(name: str) -> bytes:
    """The photo as PPM/PGM: raw pixels behind a tiny header, so its bytes (and id) never depend on zlib."""
    if name not in SAMPLE_PHOTOS:
        raise SourceError(f"unknown sample photo {name!r}: choose one of {', '.join(SAMPLE_PHOTOS)}")
    try:
        img = _load_photo_uncached(name)
    except Exception as err:  # a package missing its data file, or one that wants the network
        raise SourceError(
            f"sample photo {name!r} failed to load offline ({type(err).__name__}: {err}); "
            "install the package that ships it or use kind=folder"
        ) from None
    magic = b"P5" if img.ndim == 2 else b"P6"
    return magic + f"\n{img.shape[1]} {img.shape[0]}\n255\n".encode() + img.tobytes()


def _pnm_shape(data: bytes) -> tuple[int, int, int]:
    head = data[:64].split(maxsplit=4)
    return int(head[2]), int(head[1]), 1 if head[0] == b"P5" else 3


def load_sample_photo(name: str) -> np.ndarray:
    """A built-in real photo as uint8 HxWx3 (colour) or HxW (greyscale). Raises SourceError if unknown."""
    data = _sample_pnm(name)
    h, w, c = _pnm_shape(data)
    pixels = np.frombuffer(data, dtype=np.uint8, count=h * w * c, offset=len(data) - h * w * c)
    return pixels.reshape((h, w) if c == 1 else (h, w, 3)).copy()


def _unit(index: int, k: int) -> float:
    """A uniform number in [0, 1) from a hash: the same on every machine and numpy version."""
    digest = hashlib.sha256(f"radio-dist-view:{index}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _view_crop(index: int, width: int, height: int) -> str:
    """A deterministic random crop for view ``index``: 0.35-1.0 of the shorter side, aspect 3/4..4/3."""
    side = (0.35 + 0.65 * _unit(index, 0)) * min(width, height)
    aspect = math.exp(math.log(3 / 4) + _unit(index, 1) * math.log(16 / 9))
    cw, ch = min(width, side * math.sqrt(aspect)), min(height, side / math.sqrt(aspect))
    x0, y0 = _unit(index, 2) * (width - cw), _unit(index, 3) * (height - ch)
    box = {"x0": x0 / width, "y0": y0 / height, "x1": (x0 + cw) / width, "y1": (y0 + ch) / height}
    return canonical_json({k: min(1.0, round(v, 6)) for k, v in box.items()})


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _sample_items(views: int, photos: SamplePhotos = SamplePhotos.train) -> list[SourceItem]:
    names = SAMPLE_SETS[photos]
    if views == 0:
        return [SourceItem(SAMPLE_PREFIX + n) for n in names]
    items = []
    for i in range(views):
        name = names[i % len(names)]
        if i < len(names):
            items.append(SourceItem(SAMPLE_PREFIX + name))
        else:
            h, w, _ = _pnm_shape(_sample_pnm(name))
            items.append(SourceItem(f"{SAMPLE_PREFIX}{name}#view={i}", _view_crop(i, w, h)))
    return items


# ---------------------------------------------------------------- listing


def _fs(path: str, storage_options: dict[str, Any]):
    import fsspec

    try:
        return fsspec.core.url_to_fs(path, **storage_options)
    except Exception as err:
        raise SourceError(
            f"{path}: cannot open its filesystem ({type(err).__name__}: {err}); "
            "check the URL scheme and source.storage_options"
        ) from None


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _folder_items(cfg: SourceConfig) -> list[SourceItem]:
    path = str(cfg.path)
    fs, root = _fs(path, cfg.storage_options)
    root = root.rstrip("/") or "/"
    try:
        if not fs.isdir(root):
            if fs.exists(root):
                raise SourceError(
                    f"{path} is a file, not a folder: point source.path at a folder, or use "
                    "source.kind=list for a .parquet/.csv list of images"
                )
            raise SourceError(f"{path}: folder does not exist; check source.path (and storage_options)")
        found = fs.find(root, maxdepth=None if cfg.recursive else 1, withdirs=False, detail=True)
    except SourceError:
        raise
    except Exception as err:
        raise SourceError(
            f"{path}: cannot list folder ({type(err).__name__}: {err}); check the path, "
            "permissions and source.storage_options"
        ) from None
    uris = []
    for p, info in found.items():
        rel = p[len(root) :].lstrip("/") if p.startswith(root) else posixpath.basename(p)
        if info.get("type") != "file" or any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files/folders (.DS_Store, .git) and sockets/fifos are not inputs
        uris.append(p if _is_local(fs) else fs.unstrip_protocol(p))
    if not uris:
        raise SourceError(f"{path}: folder has no (non-hidden) files; put images there or fix source.path")
    return [SourceItem(u) for u in sorted(uris)]


def _resolve(entry: str, list_path: str) -> str:
    """Relative entries are relative to the list file's folder; absolute paths and URLs stay as they are."""
    if entry.startswith(SAMPLE_PREFIX) or "://" in entry or os.path.isabs(entry):
        return entry
    if "://" in list_path:
        proto, rest = list_path.split("://", 1)
        return f"{proto}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), entry))}"
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(list_path)), entry))


def _list_items(cfg: SourceConfig) -> list[SourceItem]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.dataset as pads

    path = str(cfg.path)
    lower = path.lower()
    fs, stripped = _fs(path, cfg.storage_options)
    try:
        if not fs.exists(stripped):
            raise SourceError(f"{path}: list file does not exist; check source.path (and storage_options)")
        if lower.endswith((".parquet", ".pq")):
            table = pads.dataset(stripped, filesystem=fs, format="parquet").to_table()
        elif lower.endswith((".csv", ".csv.gz", ".tsv")):
            opts = pacsv.ConvertOptions(column_types={cfg.column: pa.string()})
            parse = pacsv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",")
            with fs.open(stripped, "rb", compression="infer") as f:
                table = pacsv.read_csv(f, parse_options=parse, convert_options=opts)
        else:
            raise SourceError(f"{path}: unsupported list format; use a .parquet or .csv file")
    except SourceError:
        raise
    except Exception as err:
        raise SourceError(f"{path}: cannot read list file ({type(err).__name__}: {err})") from None
    if cfg.column not in table.column_names:
        raise SourceError(
            f"{path}: no column {cfg.column!r} (columns: {', '.join(table.column_names)}); "
            "set source.column to the one holding the image URIs"
        )
    values = table.column(cfg.column).cast(pa.string()).to_pylist()
    uris = {_resolve(v.strip(), path) for v in values if v is not None and v.strip()}
    if not uris:
        raise SourceError(f"{path}: column {cfg.column!r} lists no URIs; add rows or pick another column")
    return [SourceItem(u) for u in sorted(uris)]


def list_items(cfg: SourceConfig) -> list[SourceItem]:
    """The source's items in a deterministic order, ``limit`` applied.

    Folders and lists are sorted by uri (duplicates in a list collapse); sample-photo views keep their
    generation order so that a ``limit`` still spans different photos. Folders keep every non-hidden
    regular file, whatever its extension: a stray non-image must surface as an error row, not vanish.
    """
    if cfg.kind is SourceKind.folder:
        items = _folder_items(cfg)
    elif cfg.kind is SourceKind.list:
        items = _list_items(cfg)
    else:
        items = _sample_items(cfg.views, cfg.photos)
    items = items[: cfg.limit] if cfg.limit else items
    if cfg.augment.views > 1:
        items = [
            SourceItem(it.uri, augment_view(cfg.augment, it.uri, k))
            for it in items
            for k in range(cfg.augment.views)
        ]
    return items


def augment_view(aug: AugmentConfig, uri: str, k: int) -> str:
    """View ``k`` of an image: the whole image for k = 0, else a square crop of ``min_scale``..1 of the shorter
    side (centred in a box of that fraction of each side, placed at random) mirrored with chance ``flip``. Drawn
    from a hash of (seed, uri, k): the same on every machine, so a rerun lists the same views (and ids)."""
    if k == 0:
        return ""

    def u(j: int) -> float:
        digest = hashlib.sha256(f"radio-dist-augment:{aug.seed}:{uri}:{k}:{j}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    side = aug.min_scale + (1 - aug.min_scale) * u(0)
    x0, y0 = u(1) * (1 - side), u(2) * (1 - side)
    box: dict[str, Any] = {"x0": x0, "y0": y0, "x1": x0 + side, "y1": y0 + side}
    box = {key: min(1.0, round(v, 6)) for key, v in box.items()}
    if u(3) < aug.flip:
        box["flip"] = 1
    return canonical_json(box)


def view_flip(view: str) -> bool:
    """Whether a view string asks for a left-right mirror (after the crop)."""
    return bool(view) and bool(json.loads(view).get("flip", 0))


# ---------------------------------------------------------------- bytes and ids


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The input's bytes. Sample photos come back as PPM/PGM (the ``#view=`` suffix only names the item)."""
    if uri.startswith(SAMPLE_PREFIX):
        name = uri[len(SAMPLE_PREFIX) :].split("#", 1)[0]
        try:
            return _sample_pnm(name)
        except SourceError as err:
            raise ImageError(f"{uri}: {err}") from None
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError(f"{uri}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{uri}: is a directory, not a file") from None
    except PermissionError as err:
        raise ImageError(f"{uri}: permission denied ({err})") from None
    except Exception as err:
        raise ImageError(f"{uri}: cannot read ({type(err).__name__}: {err})") from None


def image_id(data: bytes, view: str = "") -> str:
    """Content id: the first 32 hex chars of sha256(bytes [+ NUL + view]). Same picture, same id."""
    h = hashlib.sha256(data)
    if view:
        h.update(b"\0" + view.encode())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- decoding

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I;16BS", "I;16LS")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def _scale_to_u8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale (not clip) high-bit-depth pixels to 8 bits: 16-bit ranges map 0..65535 -> 0..255."""
    if mode in _SIXTEEN_BIT or (mode == "I" and a.min() >= 0 and a.max() <= 65535):
        return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float64))  # 32-bit int or float: stretch the actual range
    lo, hi = float(a.min()), float(a.max())
    if mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    return np.round((a - lo) * (255 / (hi - lo if hi > lo else 1))).clip(0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        grey = _scale_to_u8(np.asarray(im), mode)
        return np.repeat(grey[..., None], 3, axis=2)
    palette_alpha = mode == "P" and ("transparency" in im.info or getattr(im.palette, "mode", "") == "RGBA")
    if mode in _WITH_ALPHA or palette_alpha:
        rgba = np.asarray(im.convert("RGBA")).astype(np.uint32)
        alpha = rgba[..., 3:4]
        return ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)  # over white
    return np.asarray(im.convert("RGB"))  # L, 1, P, CMYK, YCbCr, RGBX, ...


def decode_image(
    data: bytes,
    uri: str,
    min_side: int = 16,
    max_pixels: int = 100_000_000,
    draft_for: tuple[str, int] | None = None,
) -> DecodedImage:
    """Decode to uint8 RGB, or raise ImageError naming ``uri`` and what is wrong.

    The size is checked from the header before any pixel is decoded, so a decompression bomb costs
    nothing; the full load then surfaces truncation (LOAD_TRUNCATED_IMAGES stays off).

    ``draft_for = (view, size)``: only canonical views of ``view`` up to ``size`` px will be made from the
    result, so a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale (the decoder's DCT scaling) whose
    crop still has at least ``size`` px a side: a 4000x3000 photo for a 432 px view decodes at 1000x750 in a
    third of the time, and resampling reads 16x fewer pixels. ``width``/``height`` stay the original's, and
    :func:`canonical_view` with ``original=`` keeps its geometry in original pixels.
    """
    if not data:
        raise ImageError(f"{uri}: empty file (0 bytes)")
    if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels  # never let PIL's own bomb limit undercut the configured one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning, EXIF/palette notes: handled here
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(f"{uri}: not an image (cannot identify image file)") from None
        except Image.DecompressionBombError as err:
            m = re.search(r"\((\d+) pixels\)", str(err))
            size = f"has {int(m.group(1)) / 1e6:.0f} MP" if m else "is too large"
            raise ImageError(
                f"{uri}: image {size}, more than max_pixels={max_pixels} (decompression bomb?)"
            ) from None
        except Exception as err:
            raise ImageError(f"{uri}: corrupt image header ({type(err).__name__}: {err})") from None
        # not `with im:` — closing would free the pixels an RGB image hands on; the bytes are in
        # memory, so there is no file handle to release
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(
                f"{uri}: image is {w}x{h} px = {w * h / 1e6:.3g} MP, more than max_pixels={max_pixels}"
            )
        if min(w, h) < min_side:
            raise ImageError(f"{uri}: image is {w}x{h} px, smaller than min_side={min_side}")
        mode = im.mode
        if draft_for is not None and im.format == "JPEG":
            draft_view, draft_px = draft_for
            fx0, fy0, fx1, fy1 = parse_view(draft_view) if draft_view else (0.0, 0.0, 1.0, 1.0)
            # the crop's side in the upright image is at least this, whatever the EXIF orientation
            side = min(fx1 - fx0, fy1 - fy0) * min(w, h)
            r = draft_px / max(side, 1e-9)
            if r <= 0.5:
                try:
                    im.draft(im.mode, (math.ceil(w * r), math.ceil(h * r)))
                except Exception:
                    pass  # a JPEG the decoder cannot scale: decode it whole, as without draft_for
        try:
            im.seek(0)  # multi-frame GIF/TIFF: the first frame
            im.load()
        except Exception as err:
            msg = str(err)
            what = "truncated" if "truncat" in msg or isinstance(err, EOFError) else "corrupt image data"
            raise ImageError(f"{uri}: {what} ({type(err).__name__}: {msg})") from None
        rotated = False
        try:
            orientation = im.getexif().get(0x0112, 1)
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of an upright image
            rotated = orientation in (5, 6, 7, 8)  # a quarter turn: width and height swap
        except Exception:
            pass  # unreadable EXIF: keep the stored orientation rather than drop the image
        try:
            # an RGB image stays a PIL image: the canonical views resample it without a numpy round
            # trip (two full-size copies, ~30 % of decode time for a 0.5 MP photo)
            rgb = im if im.mode == "RGB" else Image.fromarray(np.ascontiguousarray(_to_rgb(im), np.uint8))
        except Exception as err:
            raise ImageError(
                f"{uri}: cannot convert mode {mode} to RGB ({type(err).__name__}: {err})"
            ) from None
    ow, oh = (h, w) if rotated else (w, h)  # the original's upright size (the image may be drafted)
    return DecodedImage(image=rgb, mode=mode, width=ow, height=oh)


# ---------------------------------------------------------------- canonical view


def parse_view(view: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) fractions from a view string; ImageError if it is not a valid crop."""
    try:
        box = json.loads(view)
        x0, y0, x1, y1 = (float(box[k]) for k in ("x0", "y0", "x1", "y1"))
    except Exception:
        raise ImageError(f"invalid view {view!r}: expected JSON with x0, y0, x1, y1 fractions") from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ImageError(f"invalid view {view!r}: need 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return x0, y0, x1, y1


def canonical_view(
    rgb: np.ndarray | Image.Image,
    size: int,
    view: str = "",
    resample: Resample | str = Resample.bilinear,
    original: tuple[int, int] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Crop the view, resize its shorter side to ``size`` and centre-crop a square, in one resampling.

    Returns the uint8 [size, size, 3] pixels and the geometry: the kept square in original pixel
    coordinates, which is what later shift/crop alignment of student and teacher grids needs. ``bicubic``
    resamples the exact (fractional) square with PIL; ``bilinear`` rounds the square to whole pixels and
    uses torch's antialiased uint8 kernel (the recorded square is the rounded one). ``original``: the
    (width, height) the image stands for when it was decoded smaller (``decode_image(draft_for=...)``); the
    view and the recorded square are then in the original's pixels.
    """
    if isinstance(rgb, Image.Image):
        src = rgb if rgb.mode == "RGB" else rgb.convert("RGB")
    else:
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        src = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    w, h = src.size
    ow, oh = original or (w, h)
    sx, sy = w / ow, h / oh  # image pixels per original pixel (1 unless drafted)
    x0, y0, x1, y1 = parse_view(view) if view else (0.0, 0.0, 1.0, 1.0)
    cx0, cy0, cw, ch = x0 * ow, y0 * oh, (x1 - x0) * ow, (y1 - y0) * oh
    side = min(cw, ch)
    box = (cx0 + (cw - side) / 2, cy0 + (ch - side) / 2, cx0 + (cw + side) / 2, cy0 + (ch + side) / 2)
    flip = view_flip(view) if view else False
    if Resample(resample) == Resample.bicubic:
        scaled = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        out = src.resize((size, size), Image.Resampling.BICUBIC, box=scaled, reducing_gap=3.0)
        pixels = np.asarray(out, dtype=np.uint8)
        geo: dict[str, Any] = {"crop": [float(v) for v in box], "size": int(size)}
        if flip:
            pixels, geo["flip"] = np.ascontiguousarray(pixels[:, ::-1]), True
        return pixels, geo
    import torch  # here, not at the top: listing a source needs no torch

    n = max(1, min(round(side * min(sx, sy)), w, h))
    left = min(max(0, round(box[0] * sx)), w - n)
    top = min(max(0, round(box[1] * sy)), h - n)
    if (left, top, n, n) != (0, 0, w, h):  # not the whole image: cut the square out
        src = src.crop((left, top, left + n, top + n))
    pixels = np.array(src)  # [n, n, 3], writable for torch; channels-last suits the uint8 kernel (3x faster)
    t = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    if n != size:
        t = torch.nn.functional.interpolate(
            t, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    out_px = t[0].permute(1, 2, 0).numpy()
    crop = [left / sx, top / sy, (left + n) / sx, (top + n) / sy]
    geometry: dict[str, Any] = {"crop": [float(v) for v in crop], "size": int(size)}
    if flip:
        out_px, geometry["flip"] = out_px[:, ::-1], True
    return np.ascontiguousarray(out_px), geometry
