"""`radio-dist bench views`: what each view codec stores and costs, on the bundled photos.

For every sample photo's whole-image canonical view at each size (224 and 1152 px by default), per codec: the
bytes a view takes as stored (the encoded bytes; raw is ``P·P·3``), the time to decode one view on one thread
(what the training reader spends per view, in its threads), and the PSNR of the decoded pixels against the raw
view (the teachers see the decoded pixels, so this is a change of data, not an error in the targets).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from radio_dist.sources import SAMPLE_PHOTOS, canonical_view, load_sample_photo
from radio_dist.store.views import get_view_codec

DEFAULT_CODECS = ("raw", "png", "jpeg-95", "jpeg-90", "jpeg-75", "webp-90")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def bench_views(
    sizes: Sequence[int] = (224, 1152), codecs: Sequence[str] = DEFAULT_CODECS, repeats: int = 3
) -> dict[str, Any]:
    photos = [load_sample_photo(n) for n in SAMPLE_PHOTOS]
    results = []
    for size in sizes:
        views = [canonical_view(Image.fromarray(p), size, "", "bilinear")[0] for p in photos]
        for name in codecs:
            codec = get_view_codec(name)
            if not codec.encoded:
                results.append(
                    {"size": size, "codec": name, "bytes_per_view": float(size * size * 3), "vs_raw": 1.0,
                     "decode_ms": 0.0, "psnr_db": float("inf")}
                )  # fmt: skip
                continue
            blobs = [codec.encode(v) for v in views]
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                decoded = [codec.decode(b, size) for b in blobs]
                best = min(best, (time.perf_counter() - t0) / len(blobs))
            nbytes = float(np.mean([len(b) for b in blobs]))
            results.append(
                {
                    "size": size,
                    "codec": codec.name,
                    "bytes_per_view": nbytes,
                    "vs_raw": nbytes / (size * size * 3),
                    "decode_ms": best * 1e3,
                    "psnr_db": float(np.mean([_psnr(d, v) for d, v in zip(decoded, views, strict=True)])),
                }
            )
    return {"photos": len(photos), "results": results}


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"view codecs on {report['photos']} sample photos (whole-image views; decode: one thread, best of runs)",
        f"{'px':>5} {'codec':<8} {'kB/view':>9} {'x raw':>6} {'decode ms':>9} {'PSNR dB':>8}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r['size']:>5} {r['codec']:<8} {r['bytes_per_view'] / 1e3:9.1f} {r['vs_raw']:6.3f} "
            f"{r['decode_ms']:9.2f} {r['psnr_db']:8.1f}"
        )
    return "\n".join(lines) + "\n"
