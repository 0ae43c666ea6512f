"""`radio-dist experiment NAME`: the method's claims as controlled experiments at laptop scale.

Each experiment trains two (or one) short distillations from one store that differ in a single setting — the
*arms* — on the same seed, data order and steps, evaluates them on held-out photos, and writes a Markdown
table (``OUT/NAME.md``) that says what it shows and what it does not at this scale. Arms are ordinary distill
runs under ``OUT/NAME/ARM`` (resumed like any run; an arm whose students are exported is not trained again).

- ``summary-loss``: the balanced summary loss Θ²/Disp against a plain angular loss Θ² (C-RADIOv4, Table 3).
- ``shift``: a known fixed per-position pattern added to one teacher's cached targets (a controlled stand-in
  for a ViT's position artifacts); students trained with and without shift equivariance; how much of the
  pattern each reproduces (its coefficient in the per-position mean of the student's dense features).
- ``resolutions``: one student from a two-partition store scored from 128 to 1152 px (no mode switching).
- ``together``: the C-RADIO student trained beside the other students against trained alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radio_dist.sources import SamplePhotos, SourceConfig, canonical_view
from radio_dist.store import FeatureStore, StoreError
from radio_dist.train.config import DistillConfig, default_students
from radio_dist.train.evaluate import EvalConfig, evaluate, held_out_images, load_students, to_grid
from radio_dist.train.reader import committed_shards

Progress = Callable[[str], None]

# The demo's training settings (Makefile `demo`): what every arm shares unless the experiment changes it.
BASE_TRAIN: dict[str, Any] = {
    "resolutions": {"low": [128, 160, 192, 224, 256]},
    "threads": 2,
    "checkpoint_every": 0,
}


@dataclass(frozen=True)
class Arm:
    """One training run of an experiment: its name, the train settings it changes, its students."""

    name: str
    train: dict[str, Any] = field(default_factory=dict)
    students: tuple[str, ...] = ("cradio",)
    pattern: bool = False  # trains from the derived store with the fixed pattern (experiment `shift`)


@dataclass(frozen=True)
class Experiment:
    name: str
    claim: str
    arms: tuple[Arm, ...]
    steps: int = 96  # per arm, by default (the demo's)


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "summary-loss",
            "Θ²/Disp lifts the summary fidelity of the teacher whose summaries spread less (lower Disp) "
            "relative to a plain angular loss Θ², which lets the wider-spread teacher dominate.",
            (Arm("balanced", {"summary_loss": "balanced"}), Arm("angular", {"summary_loss": "angular"})),
        ),
        Experiment(
            "shift",
            "Shift equivariance keeps a student from learning a teacher's fixed-position pattern: without it "
            "the student reproduces the pattern, with it much less.",
            # ViT-tiny: learned absolute position embeddings can hold a fixed per-position pattern (the C-RADIO
            # student's CPE draws random position windows while training, which already blurs one); one
            # resolution, the store's, so that the pattern's grid is the student's token grid
            (
                Arm("no-shift", {"max_shift": 0, "mesa_weight": 0.0}, ("vit_tiny",), pattern=True),
                Arm("shift", {"max_shift": 2, "mesa_weight": 0.0}, ("vit_tiny",), pattern=True),
            ),
            steps=300,  # a fixed pattern is learned slowly: 0.09 of it after 100 steps, 0.26 after 300
        ),
        Experiment(
            "resolutions",
            "A student trained on two partitions' resolutions keeps its fidelity over the whole range, with no "
            "collapse between or beyond them (no mode switching).",
            (Arm("both-partitions"),),
        ),
        Experiment(
            "together",
            "Training students together (one read of each batch) costs the C-RADIO student nothing against "
            "training it alone.",
            (Arm("alone"), Arm("together", students=("cradio", "vit_tiny", "convnext_atto"))),
        ),
    )
}

PATTERN_TEACHER = "mobilenet_v2"  # the pattern goes into this teacher's targets when the store has it
PATTERN_STRENGTH = 0.5  # pattern energy per token, as a fraction of the targets' mean energy per token
# Smooth: a per-token (white) pattern is learned too slowly to measure at this scale — ViT-tiny reproduced 0.05
# of one after 300 steps without shift, 0.26 of a 4x4-cell one (2026-12-03, the experiment's own settings)
PATTERN_CELLS = 4
RESOLUTIONS = [128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1152]


def arm_config(
    store: str,
    out: str,
    arm: Arm,
    steps: int,
    seed: int,
    extra: dict[str, Any] | None = None,
    partitions: list[str] | None = None,
) -> DistillConfig:
    students = {s.name: s for s in default_students()}
    unknown = [s for s in arm.students if s not in students]
    if unknown:
        raise ValueError(f"arm {arm.name}: unknown students {unknown}; built-in: {sorted(students)}")
    train = {**BASE_TRAIN, **(extra or {}), **arm.train, "seed": seed, "max_steps": steps, "epochs": 10_000}
    return DistillConfig.model_validate(
        {
            "store": {"url": store},
            "out": out,
            "students": [students[s].model_dump(mode="json") for s in arm.students],
            "train": train,
            "partitions": partitions,
        }
    )


def _arm_settings(name: str, partitions: dict[str, int]) -> tuple[dict[str, Any], list[str] | None]:
    """What an experiment sets for all its arms: ``resolutions`` over both partitions, or for ``shift`` the
    smallest partition alone at its cached size (the pattern's grid is then the student's token grid)."""
    if name == "resolutions":
        return {"resolutions": two_partitions(partitions)}, None
    if name == "shift":
        part, px = min(partitions.items(), key=lambda kv: kv[1])
        return {"resolutions": {part: [px]}}, [part]
    return {}, None


def two_partitions(meta_partitions: dict[str, int]) -> dict[str, list[int]]:
    """Training resolutions for a two-partition store: 4 sizes up to each partition's cached size."""
    (lo_name, lo), (hi_name, hi) = sorted(meta_partitions.items(), key=lambda kv: kv[1])
    lows = sorted({max(64, int(round(lo * f / 32)) * 32) for f in (0.57, 0.71, 0.86, 1.0)})
    highs = sorted({max(lo + 32, int(round(hi * f / 32)) * 32) for f in (0.71, 0.8, 0.9, 1.0)})
    return {lo_name: lows, hi_name: highs}


# -- the fixed pattern --------------------------------------------------------------------------------------
def fixed_pattern(
    grid: tuple[int, int], dim: int, energy: float, seed: int = 0, cells: int | None = PATTERN_CELLS
) -> torch.Tensor:
    """A seeded ``[h, w, C]`` pattern with mean energy per token ``energy`` (sum of squares): Gaussian on a
    ``cells`` x ``cells`` grid, bicubic-upsampled to ``grid`` (smooth, like a ViT's position artifacts), or
    Gaussian per token with ``cells=None``."""
    g = torch.Generator().manual_seed(seed)
    if cells is None:
        p = torch.randn(grid[0], grid[1], dim, generator=g, dtype=torch.float64)
    else:
        coarse = torch.randn(1, dim, cells, cells, generator=g, dtype=torch.float64)
        up = torch.nn.functional.interpolate(coarse, size=tuple(grid), mode="bicubic", align_corners=False)
        p = up[0].permute(1, 2, 0)
    p = p * math.sqrt(energy / float(p.square().sum(-1).mean()))
    return p.float()


def pattern_store(
    src: FeatureStore, dst_url: str, teacher: str, progress: Progress | None = None
) -> torch.Tensor:
    """DST = SRC with a fixed pattern added to ``teacher``'s dense targets (every partition, PHI-S space);
    returns the pattern of the first partition. Resumable (``store recode``)."""
    from radio_dist.store.recode import recode_store

    meta = src.meta()
    if teacher not in meta.teachers:
        raise StoreError(
            f"{src.url}: no teacher {teacher!r} to add a pattern to; it has {sorted(meta.teachers)}"
        )
    shard = committed_shards(src)[0].shard
    patterns = {}
    for p, out in meta.teachers[teacher].outputs.items():
        dense, _ = src.read_targets(shard, teacher, p)
        energy = float(np.square(dense.astype(np.float64)).sum(-1).mean()) * PATTERN_STRENGTH
        patterns[p] = fixed_pattern((int(out.dense[0]), int(out.dense[1])), int(out.dense[2]), energy)
    codecs = {(t, p): src.codec(t, p, meta).name for t, rec in meta.teachers.items() for p in rec.outputs}

    def add(t: str, p: str, dense: torch.Tensor) -> torch.Tensor | None:
        return dense + patterns[p] if t == teacher else None

    if progress:
        progress(f"writing {dst_url}: {src.url} with a fixed pattern in {teacher}'s targets")
    recode_store(src, FeatureStore(dst_url), codecs, transform=add)
    return patterns[sorted(patterns, key=lambda q: meta.partitions[q])[0]]


def pattern_share(
    store: FeatureStore, students: dict[str, Any], teacher: str, pattern: torch.Tensor, images: int
) -> dict[str, float]:
    """Each student's coefficient of ``pattern`` in the per-position mean of its dense predictions on held-out
    photos: ``<M, P> / <P, P>`` (1 = the whole pattern reproduced, 0 = none of it)."""
    meta = store.meta()
    part, px = min(meta.partitions.items(), key=lambda kv: kv[1])
    held = held_out_images(store, SourceConfig(photos=SamplePhotos.eval, views=images), images)
    views = np.stack([canonical_view(rgb, px, view, meta.view_resample)[0] for _, rgb, view in held.images])
    x = torch.from_numpy(views).permute(0, 3, 1, 2).float().div_(255.0)
    out = {}
    for name, st in students.items():
        with torch.no_grad():
            dense = torch.cat([st(x[i : i + 8])[teacher]["dense"] for i in range(0, len(x), 8)])
        m = to_grid(dense, (int(pattern.shape[0]), int(pattern.shape[1]))).double().mean(0)
        p = pattern.double()
        out[name] = float((m * p).sum() / (p * p).sum())
    return out


# -- running ------------------------------------------------------------------------------------------------
def _metric(result: dict[str, Any], student: str, teacher: str, res: int, metric: str) -> float | None:
    v = result["students"].get(student, {}).get(teacher, {}).get(str(res), {}).get(metric)
    return None if v is None else float(v)


def run_experiment(
    name: str,
    store_url: str,
    out: str,
    steps: int | None = None,
    seed: int = 0,
    images: int = 16,
    progress: Progress | None = None,
    train_run: Callable[[DistillConfig], Any] | None = None,
) -> dict[str, Any]:
    """Train the experiment's arms (skipping exported ones), evaluate them, write ``OUT/NAME.md`` and
    ``OUT/NAME.json``; returns the JSON (arms' evaluations, the table's rows and the Markdown)."""
    from radio_dist.train.distill import run_distill

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    exp = EXPERIMENTS[name]
    steps = steps or exp.steps
    store = FeatureStore(store_url)
    meta = store.meta()
    root = Path(out) / name
    root.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda m: None)
    teacher = PATTERN_TEACHER if PATTERN_TEACHER in meta.teachers else sorted(meta.teachers)[0]
    pattern = None
    if name == "resolutions" and len(meta.partitions) != 2:
        raise StoreError(
            f"{store.url} has {len(meta.partitions)} partition(s) ({', '.join(meta.partitions)}); experiment "
            "resolutions needs two — cache one with --set 'pipeline.partitions={low: 224, high: 448}'"
        )
    if any(a.pattern for a in exp.arms):
        pattern = pattern_store(store, str(root / "store-pattern"), teacher, say)
    train, partitions = _arm_settings(name, dict(meta.partitions))  # what every arm of the experiment shares
    res_list = RESOLUTIONS if name == "resolutions" else [min(meta.partitions.values())]
    ecfg = EvalConfig(
        source=SourceConfig(photos=SamplePhotos.eval, views=images),
        images=images,
        resolutions=res_list,
        batch_size=2 if name == "resolutions" else 8,
    )
    results: dict[str, dict[str, Any]] = {}
    for arm in exp.arms:
        arm_store = str(root / "store-pattern") if arm.pattern else store.url
        cfg = arm_config(arm_store, str(root / arm.name), arm, steps, seed, train, partitions)
        record = root / arm.name / "arm.json"  # what the arm was trained as, written once it is exported
        want = {
            "store": arm_store,
            "steps": steps,
            "seed": seed,
            "train": arm.train,
            "students": arm.students,
        }
        want = json.loads(json.dumps(want))
        if record.is_file():
            had = json.loads(record.read_text())
            if had != want:
                changed = sorted(k for k in want if had.get(k) != want[k])
                raise ValueError(
                    f"{root / arm.name} holds arm {arm.name} trained with other settings ({', '.join(changed)}: "
                    f"{', '.join(f'{had.get(k)} -> {want[k]}' for k in changed)}); pass another --out or remove it"
                )
        else:
            say(f"arm {arm.name}: {steps} steps, students {', '.join(arm.students)}")
            (train_run or run_distill)(cfg)  # resumes a run interrupted under OUT/NAME/ARM
            record.write_text(json.dumps(want, indent=1))
        students = load_students([str(root / arm.name / "students" / s) for s in arm.students])
        say(f"arm {arm.name}: evaluating on held-out photos at {', '.join(map(str, res_list))} px")
        result = evaluate(store, students, ecfg)
        if pattern is not None:
            result["pattern_share"] = pattern_share(store, students, teacher, pattern, images)
        results[arm.name] = result
    report = _report(exp, results, meta, teacher, steps, seed)
    report["arms"] = results
    (Path(out) / f"{name}.json").write_text(json.dumps(report, indent=1))
    (Path(out) / f"{name}.md").write_text(report["markdown"])
    return report


def _floor(mean: dict[str, Any], teacher: str, res: int, metric: str) -> float | None:
    """The store-mean predictor's figure (``evaluate``'s ``mean_predictor``), as ``_metric`` gives a student's."""
    v = mean.get(teacher, {}).get(str(res), {}).get(metric)
    return None if v is None else float(v)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _report(
    exp: Experiment, results: dict[str, dict[str, Any]], meta: Any, teacher: str, steps: int, seed: int
) -> dict[str, Any]:
    first = next(iter(results.values()))
    teachers = sorted(meta.teachers)
    mean = first["mean_predictor"].get("mean", {})
    res0 = str(first["resolutions"][0])
    lines = [f"**{exp.name}** — claim: {exp.claim}", ""]
    rows: list[list[str]] = []
    if exp.name == "summary-loss":
        b, a = results["balanced"], results["angular"]
        r = int(res0)
        head = [
            "teacher",
            "Disp",
            "summary Θ²/Disp",
            "summary Θ²",
            "Δ",
            "store mean",
            "dense Θ²/Disp",
            "dense Θ²",
        ]
        for t in teachers:
            st = exp.arms[0].students[0]
            sb, sa = _metric(b, st, t, r, "summary_cos"), _metric(a, st, t, r, "summary_cos")
            rows.append(
                [
                    t,
                    _fmt(meta.teachers[t].summary_dispersion),
                    _fmt(sb),
                    _fmt(sa),
                    _fmt(None if sb is None or sa is None else sb - sa, 3),
                    _fmt(_floor(mean, t, r, "summary_cos")),
                    _fmt(_metric(b, st, t, r, "dense_cos")),
                    _fmt(_metric(a, st, t, r, "dense_cos")),
                ]
            )
    elif exp.name == "shift":
        r = int(res0)
        head = ["student", "max_shift", "pattern reproduced", f"dense fidelity ({teacher})", "store mean"]
        rows.append(["cached targets", "–", "1.000", "–", "–"])
        for arm in exp.arms:
            res, st = results[arm.name], arm.students[0]
            rows.append(
                [
                    f"{st} ({arm.name})",
                    str(arm.train["max_shift"]),
                    _fmt(res["pattern_share"][st]),
                    _fmt(_metric(res, st, teacher, r, "dense_cos")),
                    _fmt(_floor(mean, teacher, r, "dense_cos")),
                ]
            )
    elif exp.name == "resolutions":
        res = results["both-partitions"]
        head = ["px", "partition"] + [f"dense {t}" for t in teachers] + [f"summary {t}" for t in teachers]
        for rr in res["resolutions"]:
            rows.append(
                [str(rr), res["reference_partition"][rr] if rr in res["reference_partition"] else "–"]
                + [_fmt(_metric(res, "cradio", t, rr, "dense_cos")) for t in teachers]
                + [_fmt(_metric(res, "cradio", t, rr, "summary_cos")) for t in teachers]
            )
        floors = [mean.get(t, {}) for t in teachers]
        rows.append(
            ["store mean", " / ".join(sorted(meta.partitions, key=lambda q: meta.partitions[q]))]
            + [" / ".join(_fmt(v.get("dense_cos")) for v in f.values()) for f in floors]
            + [" / ".join(_fmt(v.get("summary_cos")) for v in f.values()) for f in floors]
        )
    else:  # together
        r = int(res0)
        head = ["teacher", "metric", "cradio alone", "cradio together", "Δ", "store mean"]
        for t in teachers:
            for metric, label in (("dense_cos", "dense"), ("summary_cos", "summary")):
                al = _metric(results["alone"], "cradio", t, r, metric)
                to = _metric(results["together"], "cradio", t, r, metric)
                rows.append(
                    [
                        t,
                        label,
                        _fmt(al),
                        _fmt(to),
                        _fmt(None if al is None or to is None else to - al),
                        _fmt(_floor(mean, t, r, metric)),
                    ]
                )
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [
        "",
        f"{steps} steps per arm, seed {seed}, students {', '.join(sorted({s for a in exp.arms for s in a.students}))}, {first['images']} held-out "
        f"views of photos no arm trained on ({first['source']}); cosine to the teacher, dense in PHI-S space.",
    ]
    return {
        "experiment": exp.name,
        "claim": exp.claim,
        "header": head,
        "rows": rows,
        "markdown": "\n".join(lines) + "\n",
    }
