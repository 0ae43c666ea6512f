"""`radio-dist distill` and `radio-dist eval`, and the progress bar every training command shows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from radio_dist.cli.common import (
    ConfigOpt,
    JsonOpt,
    SetOpt,
    err,
    fail,
    fmt,
    json_only_stdout,
    out,
    print_json,
    source_from_arg,
)
from radio_dist.config import ConfigError, apply_overrides, read_yaml, validate


def train_with_progress(
    label: str,
    run: Callable[[Callable[[dict[str, Any]], None] | None], dict[str, Any]],
    step_key: str,
    info: Callable[[dict[str, Any]], str],
    as_json: bool,
    errors: tuple[type[Exception], ...],
) -> dict[str, Any]:
    """Run a Ray Train job (``run(on_metrics)``) with a step progress bar on stderr fed by its metrics lines;
    with --json no bar, and stdout is the summary alone. ``errors`` become a clear exit 2."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
    )
    task = None

    def on_metrics(m: dict[str, Any]) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(label, total=m["total_steps"], info="")
        progress.update(task, completed=m[step_key], info=info(m))

    if as_json:
        json_only_stdout()
    try:
        return run(None if as_json else on_metrics)
    except errors as e:
        progress.stop()  # before the message, so the bar does not redraw over it
        fail(str(e))
    finally:
        progress.stop()


def build_distill_config(
    config: Path | None, store: str | None, out_dir: str | None, overrides: list[str]
) -> Any:
    from radio_dist.train.config import DistillConfig, default_students

    data = read_yaml(config) if config else {}
    if "students" not in data:  # materialize the default family so `--set students.0.arch=...` works
        data["students"] = [s.model_dump(mode="json") for s in default_students()]
    if store is not None:
        data.setdefault("store", {})["url"] = store
    if out_dir is not None:
        data["out"] = out_dir
    apply_overrides(data, overrides, DistillConfig)
    if "url" not in data.get("store", {}):
        raise ConfigError("no store given: pass --store PATH_OR_URL (or set store.url in the config file)")
    if "out" not in data:
        raise ConfigError("no run directory given: pass --out DIR (or set out in the config file)")
    return validate(DistillConfig, data, str(config) if config else "command line")


def distill_cmd(
    store: Annotated[
        str | None, typer.Option(help="Feature store to train from (local path or s3://).")
    ] = None,
    out_dir: Annotated[
        str | None,
        typer.Option("--out", help="Run directory: checkpoints, metrics.jsonl, exported students."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train every student at once from the cached targets (resumes from OUT's last checkpoint)."""
    from radio_dist.store import StoreError
    from radio_dist.train.distill import run_distill

    try:
        cfg = build_distill_config(config, store, out_dir, set_ or [])
    except ConfigError as e:
        fail(str(e))

    def info(m: dict[str, Any]) -> str:
        losses = "  ".join(
            f"{s.name} {m[f'{s.name}/total']:.3f}" for s in cfg.students if f"{s.name}/total" in m
        )
        return f"epoch {m['epoch']} {m['resolution']}px  {losses}"

    summary = train_with_progress(
        "distill",
        lambda follow: run_distill(cfg, follow),
        "global_step",
        info,
        as_json,
        (StoreError, ConfigError),
    )
    if as_json:
        print_json(summary)
        return
    t = Table(title=f"distill -> {cfg.out}", show_header=False)
    t.add_row("students", ", ".join(summary["students"]))
    t.add_row("teachers", ", ".join(summary["teachers"]))
    t.add_row("images in store", str(summary["rows"]))
    t.add_row("steps", str(summary["global_step"]))
    t.add_row("wall time", f"{summary['wall_s']:.1f} s")
    last = summary["last"]
    for s in summary["students"]:
        parts = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith(f"{s}/")}
        t.add_row(f"last loss {s}", "  ".join(f"{k} {v:.3f}" for k, v in sorted(parts.items())))
    t.add_row("metrics", f"{cfg.out}/metrics.jsonl")
    t.add_row("exported", f"{cfg.out}/students/<name>  (radio_dist.train.students.load_student)")
    out.print(t)


def eval_cmd(
    run: Annotated[str, typer.Argument(help="A distill run directory (its students/ are evaluated).")],
    store: Annotated[str, typer.Option(help="The store the students were trained from (teachers, PHI-S).")],
    source: Annotated[
        str | None,
        typer.Option(
            help="Held-out photos: a folder, a .parquet/.csv list or s3:// prefix (default: the sample photos "
            "every default store keeps out). Images the store trained on are refused."
        ),
    ] = None,
    images: Annotated[int, typer.Option(help="Held-out images to score.")] = 16,
    resolutions: Annotated[
        str | None,
        typer.Option(help="Comma-separated student resolutions (default 0.5x/1x/1.5x partitions)."),
    ] = None,
    pictures: Annotated[
        Path | None,
        typer.Option(
            help="Write PNGs here: features of held-out photos as PCA-RGB (teacher next to each student), "
            "loss curves, fidelity against resolution."
        ),
    ] = None,
    picture_photos: Annotated[int, typer.Option(help="Held-out photos in the feature pictures.", min=1)] = 4,
    as_json: JsonOpt = False,
) -> None:
    """Cosine fidelity of each student to each teacher on held-out photos, at several resolutions."""
    from radio_dist.sources import SamplePhotos, SourceConfig, SourceError
    from radio_dist.store import FeatureStore, StoreError
    from radio_dist.train.evaluate import EvalConfig, evaluate, load_students

    paths = exported_students(run)
    if as_json:
        json_only_stdout()
    try:
        res_list = [int(r) for r in resolutions.split(",")] if resolutions else None
        src = (
            SourceConfig.model_validate(source_from_arg(source))
            if source
            else SourceConfig(photos=SamplePhotos.eval, views=images)
        )
        cfg = EvalConfig(
            source=src, images=images, resolutions=res_list, pictures=picture_photos if pictures else 0
        )
        kept: dict[str, dict[str, Any]] = {}
        result = evaluate(
            FeatureStore(store), load_students(paths), cfg, progress=lambda m: err.print(m), pictures=kept
        )
    except (StoreError, SourceError, ValueError) as e:
        fail(str(e))
    if pictures is not None:
        result["pictures"] = [str(p) for p in write_pictures(Path(run), result, kept, pictures)]
    if as_json:
        print_json(result)
        return
    src = result["source"]
    out.print(
        f"fidelity on {result['images']} held-out photos ({src}; {result['refused']} refused as trained on)"
    )
    for metric, what in (("dense_cos", "dense, PHI-S space"), ("summary_cos", "summary")):
        out.print(f"[bold]{what}[/]: cosine to the teacher")
        out.print(fidelity_table(result, metric))
    for path in result.get("pictures", []):
        out.print(f"wrote {path}")


def write_pictures(
    run: Path, result: dict[str, Any], kept: dict[str, dict[str, Any]], out_dir: Path
) -> list[Path]:
    """The PNGs of ``eval --pictures``: feature sheets, loss curves (when the run has metrics), fidelity."""
    from radio_dist.train import pictures as P
    from radio_dist.train.rundir import read_metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = P.write_feature_sheets(kept, out_dir)
    if (run / "metrics.jsonl").is_file():
        lines = read_metrics(str(run))  # a step re-run after a restart: its latest line
        if lines:
            paths.append(P.loss_curves(lines, list(result["students"]), out_dir))
    paths.append(P.fidelity_plot(result, out_dir))
    return paths


def fidelity_table(result: dict[str, Any], metric: str) -> Table:
    """One metric of an evaluation: a row per student and teacher, a column per resolution (fits 80 columns),
    then the floors per teacher: the best untrained student and the store-mean predictor."""
    res = [str(r) for r in result["resolutions"]]
    t = Table()
    t.add_column("student")
    t.add_column("teacher")
    for r in res:
        t.add_column(f"{r}px", justify="right")
    teachers = sorted({tt for per_t in result["students"].values() for tt in per_t})
    for teacher in teachers:
        for name, per_t in result["students"].items():
            if teacher in per_t:
                t.add_row(name, teacher, *[fmt(per_t[teacher].get(r, {}).get(metric)) for r in res])
        floors = [result["untrained"].get(n, {}).get(teacher, {}) for n in result["untrained"]]
        best = [
            max(
                (f.get(r, {}).get(metric) for f in floors if f.get(r, {}).get(metric) is not None),
                default=None,
            )
            for r in res
        ]
        t.add_row("[dim](untrained)[/]", teacher, *[f"[dim]{fmt(b)}[/]" for b in best])
        mean: dict[str, dict[str, float]] = result.get("mean_predictor", {}).get("mean", {}).get(teacher, {})
        floor = next(iter(mean.values()), {}).get(metric)  # the average cached target: one value
        t.add_row("[dim](store mean)[/]", teacher, *[f"[dim]{fmt(floor)}[/]"] * len(res), end_section=True)
    return t


def probe_cmd(
    run: Annotated[str, typer.Argument(help="A distill run directory (its students/ are probed).")],
    store: Annotated[str, typer.Option(help="The store the students were trained from (teachers, PHI-S).")],
    dataset: Annotated[
        str, typer.Option(help="digits (bundled) | fashion-mnist (Debian dataset-fashion-mnist).")
    ],
    train: Annotated[int, typer.Option("--train", min=20, help="Labelled images the probes fit on.")] = 1000,
    test: Annotated[int, typer.Option("--test", min=1, help="Labelled images they are scored on.")] = 500,
    px: Annotated[
        int | None, typer.Option(help="Input size (default: the store's smallest partition).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """kNN (cosine, k=20) and logistic-regression accuracy on summary features: each student's next to its
    teacher's, an untrained student's and raw pixels."""
    from radio_dist.store import FeatureStore, StoreError
    from radio_dist.train.evaluate import load_students
    from radio_dist.train.probe import ProbeDataError, probe

    paths = exported_students(run)
    if as_json:
        json_only_stdout()
    try:
        res = probe(
            FeatureStore(store),
            load_students(paths),
            dataset,
            train,
            test,
            px,
            progress=lambda m: err.print(m),
        )
    except (StoreError, ProbeDataError, ValueError) as e:
        fail(str(e))
    if as_json:
        print_json(res)
        return
    out.print(
        f"{res['dataset']}: {res['train']} train / {res['test']} test images, {res['classes']} classes, "
        f"{res['px']} px; accuracy (kNN k=20 cosine / logistic regression)"
    )
    t = Table()
    for c in ("features", "kNN", "logreg", "of teacher"):
        t.add_column(c, justify="left" if c == "features" else "right")
    raw = res["raw_pixels"]
    t.add_row("raw pixels", fmt(raw["knn"]), fmt(raw["logreg"]), "", end_section=True)
    for teacher, entry in res["teachers"].items():
        t.add_row(f"{teacher} (teacher)", fmt(entry["teacher"]["knn"]), fmt(entry["teacher"]["logreg"]), "1")
        for name, acc in entry["students"].items():
            frac = entry["fraction_of_teacher"][name]
            t.add_row(
                f"  {name}",
                fmt(acc["knn"]),
                fmt(acc["logreg"]),
                f"{fmt(frac['knn'])} / {fmt(frac['logreg'])}",
            )
        for name, acc in entry["untrained"].items():
            t.add_row(
                f"  [dim]{name} untrained[/]",
                fmt(acc["knn"]),
                fmt(acc["logreg"]),
                "",
                end_section=name == list(entry["untrained"])[-1],
            )
    out.print(t)


def exported_students(run: str) -> list[str]:
    """The exported students of a run directory (RUN/students/<name>/config.json); none: one line, exit 2."""
    root = Path(run) / "students"
    paths = sorted(str(p) for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    if not paths:
        fail(f"{run}: no exported students under {root} — run `radio-dist distill --out {run}` first")
    return paths
