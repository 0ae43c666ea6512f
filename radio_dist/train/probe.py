"""Downstream probes of the students' summary features: kNN and logistic-regression accuracy on labelled images.

For each teacher of the store whose summary the students predict, the same labelled images go through the
teacher (live, from the spec and weights the store recorded), every trained student (its predicted summary for
that teacher) and an untrained student of the same spec; raw pixels are the floor. Each feature set is scored
by a cosine kNN (k = 20) and a logistic regression (standardized features) trained on one split and tested on
the other. A student's accuracy as a fraction of its teacher's says how much of what the teacher's embedding
separates the student's prediction of it keeps.

Datasets: ``digits`` (scikit-learn's bundled 1797 8×8 handwritten digits, offline) and ``fashion-mnist``
(Debian's ``dataset-fashion-mnist`` package: IDX files under /usr/share/datasets/fashion-mnist, or the folder
``RADIO_DIST_FASHION_MNIST`` names).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from radio_dist.store import FeatureStore, StoreError
from radio_dist.teacher import create_teacher, spec_from_record
from radio_dist.train.evaluate import untrained_like
from radio_dist.train.students import LoadedStudent

DATASETS = ("digits", "fashion-mnist")
FASHION_ENV = "RADIO_DIST_FASHION_MNIST"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
K_NEIGHBOURS = 20


class ProbeDataError(ValueError):
    """A dataset cannot be read; the message names the file and what to install."""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array: uint8 images ``[N, H, W]`` or labels ``[N]``."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ProbeDataError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ProbeDataError(f"{path}: truncated ({data.size} bytes of data for shape {dims})")
    return data.reshape(dims)


def fashion_file(name: str) -> Path:
    root = Path(os.environ.get(FASHION_ENV) or FASHION_DIR)
    for cand in (root / f"{name}.gz", root / name):
        if cand.is_file():
            return cand
    raise ProbeDataError(
        f"Fashion-MNIST: {root / name}(.gz) not found — install Debian's package "
        f"(`sudo apt-get install dataset-fashion-mnist`) or point {FASHION_ENV} at a folder of its IDX files"
    )


def load_dataset(
    name: str, n_train: int, n_test: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels); images grey uint8 ``[N, H, W]``, class-balanced
    subsets drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
        y = d.target.astype(np.int64)
        order = rng.permutation(len(x))
        if n_train + n_test > len(x):
            raise ProbeDataError(f"digits has {len(x)} images; --train {n_train} + --test {n_test} is more")
        tr, te = order[:n_train], order[n_train : n_train + n_test]
        return x[tr], y[tr], x[te], y[te]
    if name == "fashion-mnist":
        xs = {k: read_idx(fashion_file(f)) for k, f in FASHION_FILES.items()}
        tr = rng.permutation(len(xs["train_images"]))[:n_train]
        te = rng.permutation(len(xs["test_images"]))[:n_test]
        return (
            xs["train_images"][tr],
            xs["train_labels"][tr].astype(np.int64),
            xs["test_images"][te],
            xs["test_labels"][te].astype(np.int64),
        )
    raise ProbeDataError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")


def to_views(grey: np.ndarray, px: int) -> np.ndarray:
    """Grey ``[N, h, w]`` uint8 -> RGB uint8 ``[N, px, px, 3]`` (bilinear, antialiased when shrinking)."""
    x = torch.from_numpy(grey).float()[:, None]
    x = F.interpolate(x, size=(px, px), mode="bilinear", align_corners=False, antialias=px < grey.shape[-1])
    return (
        x.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()
    )


def accuracies(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """kNN (cosine, k = 20) and logistic-regression accuracy of features ``[N, C]``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    knn = KNeighborsClassifier(n_neighbors=min(K_NEIGHBOURS, len(train)), metric="cosine").fit(train, y_train)
    logreg = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    logreg.fit(train, y_train)
    return {
        "knn": float((knn.predict(test) == y_test).mean()),
        "logreg": float((logreg.predict(test) == y_test).mean()),
    }


def probe(
    store: FeatureStore,
    students: dict[str, LoadedStudent],
    dataset: str,
    n_train: int = 1000,
    n_test: int = 500,
    px: int | None = None,
    batch: int = 32,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Probe accuracies: ``{"raw_pixels": acc, "teachers": {t: {"teacher": acc, "students": {s: acc},
    "untrained": {s: acc}, "fraction_of_teacher": {s: {"knn", "logreg"}}}}}``; acc = {"knn", "logreg"}."""
    meta = store.meta()
    size = px or min(int(v) for v in meta.partitions.values())
    x_tr, y_tr, x_te, y_te = load_dataset(dataset, n_train, n_test, seed)
    views = to_views(np.concatenate([x_tr, x_te]), size)
    n = len(x_tr)
    result: dict[str, Any] = {
        "dataset": dataset,
        "train": n,
        "test": len(x_te),
        "px": size,
        "classes": int(len(np.unique(y_tr))),
        "raw_pixels": accuracies(x_tr.reshape(n, -1), y_tr, x_te.reshape(len(x_te), -1), y_te, seed),
        "teachers": {},
    }
    images = torch.from_numpy(views).permute(0, 3, 1, 2).float().div_(255.0)
    floors = {name: untrained_like(s) for name, s in students.items()}
    for t in sorted({t for s in students.values() for t in s.teacher_names}):
        if meta.teachers[t].outputs and all(o.summary is None for o in meta.teachers[t].outputs.values()):
            continue  # a teacher without a summary (SAM3's encoder): nothing to probe
        if progress:
            progress(f"teacher {t} on {len(views)} {dataset} images at {size} px")
        teacher = create_teacher(spec_from_record(meta.teachers[t].spec))
        summaries = []
        for i in range(0, len(views), batch):
            out = teacher(views[i : i + batch]).summary
            assert out is not None
            summaries.append(out.float().numpy())
        feats = {"teacher": np.concatenate(summaries)}
        del teacher
        entry: dict[str, Any] = {"teacher": None, "students": {}, "untrained": {}, "fraction_of_teacher": {}}
        entry["teacher"] = accuracies(feats["teacher"][:n], y_tr, feats["teacher"][n:], y_te, seed)
        for group, models in (("students", students), ("untrained", floors)):
            for name, st in models.items():
                if t not in st.teacher_names:
                    continue
                with torch.no_grad():
                    f = np.concatenate(
                        [
                            st(images[i : i + batch])[t]["summary"].float().numpy()
                            for i in range(0, len(images), batch)
                        ]  # type: ignore[union-attr]
                    )
                entry[group][name] = accuracies(f[:n], y_tr, f[n:], y_te, seed)
        for name, acc in entry["students"].items():
            entry["fraction_of_teacher"][name] = {
                k: acc[k] / entry["teacher"][k] if entry["teacher"][k] else None for k in ("knn", "logreg")
            }
        result["teachers"][t] = entry
    if not result["teachers"]:
        raise StoreError(
            f"{store.url}: no teacher with a summary that the students predict; nothing to probe"
        )
    return result
