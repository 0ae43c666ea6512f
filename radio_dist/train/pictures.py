"""Pictures of a distillation run: dense features as PCA-RGB, loss curves, fidelity against resolution.

* **Features** (``features_<teacher>.png``): for a few held-out photos, the photo, the teacher's dense features
  and each student's prediction of them, side by side. One projection per teacher: the top three principal
  components of the *teacher's* features (PHI-S space) over all the photos shown, each scaled by its 1st-99th
  percentile on the teacher, then applied unchanged to every student — so equal colours mean equal features,
  and a student that predicts the teacher's structure shows the teacher's picture. Panels are ``PANEL`` px,
  nearest-neighbour enlarged (a token is a block).
* **Losses** (``losses.png``): each student's loss terms per teacher from ``metrics.jsonl``, against the step
  (a moving average over ~1/20 of the run).
* **Fidelity** (``fidelity.png``): each student's dense and summary cosine to each teacher against the
  evaluation resolution, with the floors (the untrained student, the store-mean predictor) drawn dashed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

PANEL = 160  # px per panel side
LABEL = 18  # px of label strip above each column


def pca_projection(features: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [C], components [C, k], (lo, hi) [2, k]): the top-k principal directions of ``features`` [N, C]
    and the 1st/99th percentiles of the projections along them (what maps to 0 and 1)."""
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:k].T
    proj = (x - mean) @ comps
    return mean, comps, np.percentile(proj, [1, 99], axis=0)


def to_rgb(dense: np.ndarray, mean: np.ndarray, comps: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """``[h, w, C]`` features -> uint8 ``[h, w, 3]`` through a projection (colours clipped at its bounds)."""
    proj = (dense.reshape(-1, dense.shape[-1]).astype(np.float64) - mean) @ comps
    lo, hi = bounds
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return (rgb.reshape(*dense.shape[:2], comps.shape[1]) * 255).round().astype(np.uint8)


def panel(img: np.ndarray) -> Image.Image:
    """An RGB array as a ``PANEL`` px square (nearest-neighbour, so feature tokens stay blocks)."""
    return Image.fromarray(img).resize((PANEL, PANEL), Image.Resampling.NEAREST)


def feature_sheet(
    photos: np.ndarray, teacher: np.ndarray, students: dict[str, np.ndarray], title: str
) -> Image.Image:
    """Rows: photos; columns: the photo, the teacher's features, each student's prediction (PCA-RGB).

    ``photos`` uint8 ``[N, H, W, 3]``; ``teacher`` ``[N, h, w, C]``; ``students[name]`` ``[N, h', w', C]`` (any
    grid), all in the same feature space (PHI-S)."""
    n = len(photos)
    mean, comps, bounds = pca_projection(teacher.reshape(-1, teacher.shape[-1]))
    columns = ["photo", title, *students]
    sheet = Image.new("RGB", (PANEL * len(columns), LABEL + PANEL * n), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((PANEL * j + 4, 3), name[:24], fill="black")
    for i in range(n):
        row = [panel(photos[i]), panel(to_rgb(teacher[i], mean, comps, bounds))]
        row += [panel(to_rgb(s[i], mean, comps, bounds)) for s in students.values()]
        for j, p in enumerate(row):
            sheet.paste(p, (PANEL * j, LABEL + PANEL * i))
    return sheet


def write_feature_sheets(pictures: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """One ``features_<teacher>.png`` per teacher of ``pictures`` (what ``evaluate(..., pictures=k)`` keeps)."""
    paths = []
    for teacher, pic in sorted(pictures.items()):
        path = out / f"features_{teacher}.png"
        sheet = feature_sheet(pic["photos"], pic["teacher"], pic["students"], f"{teacher} (teacher)")
        sheet.save(path)
        paths.append(path)
    return paths


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) <= window:
        return y
    kernel = np.ones(window) / window
    return np.convolve(np.pad(y, (window // 2, window - 1 - window // 2), mode="edge"), kernel, mode="valid")


def loss_curves(metrics: list[dict[str, Any]], students: list[str], out: Path) -> Path:
    """``losses.png``: one panel per student, a line per loss term (each teacher's spatial and summary, MESA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [m for m in metrics if "global_step" in m]
    if not rows:
        raise ValueError(f"{out}: metrics.jsonl has no training steps to draw")
    steps = np.array([m["global_step"] for m in rows], dtype=float)
    window = max(1, len(rows) // 20)
    fig, axes = plt.subplots(1, len(students), figsize=(4.2 * len(students), 3.2), squeeze=False)
    for ax, s in zip(axes[0], students, strict=True):
        keys = sorted(
            k[len(s) + 1 :]
            for k in rows[-1]
            if k.startswith(f"{s}/") and (k.endswith(("/spatial", "/summary")) or k.endswith("/mesa"))
        )
        for key in keys:
            y = np.array([m.get(f"{s}/{key}", np.nan) for m in rows], dtype=float)
            ax.plot(steps, smooth(y, window), label=key)
        ax.set_title(s)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss (moving average)")
    fig.tight_layout()
    path = out / "losses.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fidelity_plot(result: dict[str, Any], out: Path) -> Path:
    """``fidelity.png``: per teacher, dense and summary cosine against resolution for every student, the floors
    dashed (an evaluation result of :func:`radio_dist.train.evaluate.evaluate`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = sorted({t for per_t in result["students"].values() for t in per_t})
    res = [int(r) for r in result["resolutions"]]
    fig, axes = plt.subplots(2, len(teachers), figsize=(4.2 * len(teachers), 6), squeeze=False)
    for j, teacher in enumerate(teachers):
        for i, metric in enumerate(("dense_cos", "summary_cos")):
            ax = axes[i][j]
            for name, per_t in result["students"].items():
                ys = [per_t.get(teacher, {}).get(str(r), {}).get(metric, np.nan) for r in res]
                ax.plot(res, ys, marker="o", label=name)
            floors = [result["untrained"].get(n, {}).get(teacher, {}) for n in result["untrained"]]
            untrained = [
                max((f.get(str(r), {}).get(metric, -1.0) for f in floors), default=np.nan) for r in res
            ]
            ax.plot(res, untrained, "k:", label="untrained (best)")
            per_px: dict[str, dict[str, float]] = result["mean_predictor"].get("mean", {}).get(teacher, {})
            mean = next(iter(per_px.values()), {})
            if metric in mean:
                ax.axhline(mean[metric], color="grey", linestyle="--", label="store mean")
            ax.set_title(f"{teacher}: {'dense (PHI-S)' if i == 0 else 'summary'}")
            ax.set_xlabel("student resolution (px)")
            ax.set_ylabel("cosine to the teacher")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"fidelity on {result['images']} held-out photos")
    fig.tight_layout()
    path = out / "fidelity.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
