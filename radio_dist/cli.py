"""The `radio-dist` command line.

radio-dist cache-teachers --store ./store                       # built-in photos, two real teachers, local Ray
radio-dist cache-teachers --config jobs/configs/cache_sample.yaml --set store.shard_size=64
radio-dist cache-teachers --source ./photos --store s3://bucket/store --teachers efficientnet_lite0
radio-dist teachers list
radio-dist store info ./store [--json]
radio-dist store verify ./store
radio-dist bench cache --json
radio-dist distill --store ./store --out ./runs/demo            # C-RADIO + 2 smaller students, local Ray Train
radio-dist distill --config jobs/configs/distill_sample.yaml --set train.epochs=4
radio-dist eval ./runs/demo --store ./store
radio-dist bench ingest --json
radio-dist submit distill --config jobs/configs/distill_sample.yaml --address http://HEAD:8265 --set out=s3://b/run
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from radio_dist.config import ConfigError, apply_overrides, read_yaml, validate

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Cache vision teachers; distill students.")
teachers_app = typer.Typer(no_args_is_help=True, help="Registered teacher families.")
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature store.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures in the README).")
featsharp_app = typer.Typer(
    no_args_is_help=True, help="FeatSharp: the learned upsampler of a low-resolution teacher (SigLIP2)."
)
app.add_typer(teachers_app, name="teachers")
app.add_typer(store_app, name="store")
app.add_typer(bench_app, name="bench")
app.add_typer(featsharp_app, name="featsharp")

err = Console(stderr=True, soft_wrap=True)
out = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
StoreArg = Annotated[str, typer.Argument(help="Store root: local path or fsspec URL (s3://bucket/prefix).")]


_json_fd: int | None = None


def _json_only_stdout() -> None:
    """`--json` on a command that runs Ray: from here on the process's stdout (fd 1) is stderr, and only the JSON
    document goes to the real stdout. Ray's core worker writes notices (a killed actor, a retried task) to fd 1 at
    any time, even after the summary is printed, so turning off log forwarding is not enough."""
    global _json_fd
    if _json_fd is not None:
        return
    try:
        if sys.stdout.fileno() != 1:
            return
    except (AttributeError, OSError, ValueError):  # in-process test runners swap stdout for a buffer
        return
    sys.stdout.flush()
    _json_fd = os.dup(1)
    os.dup2(2, 1)


def _print_json(doc: Any) -> None:
    text = json.dumps(doc, indent=1, default=str) + "\n"
    if _json_fd is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    os.write(_json_fd, text.encode())


def _fail(msg: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def source_from_arg(arg: str) -> dict[str, Any]:
    """`--source` shorthand: 'sample-photos', a .parquet/.csv list of URIs, or a folder / s3:// prefix."""
    if arg == "sample-photos":
        return {"kind": "sample-photos"}
    if arg.lower().endswith((".parquet", ".csv")):
        return {"kind": "list", "path": arg}
    return {"kind": "folder", "path": arg}


def build_cache_config(
    config: Path | None,
    source: str | None,
    store: str | None,
    teachers: str | None,
    views: int | None,
    limit: int | None,
    overrides: list[str],
) -> Any:
    from radio_dist.cache.config import DEFAULT_TEACHERS, CacheJobConfig
    from radio_dist.teacher import preset_spec

    data = read_yaml(config) if config else {}
    if source is not None:
        data["source"] = {
            **source_from_arg(source),
            **{k: v for k, v in data.get("source", {}).items() if k not in {"kind", "path"}},
        }
    if store is not None:
        data.setdefault("store", {})["url"] = store
    if teachers is not None:
        names = [n.strip() for n in teachers.split(",") if n.strip()]
        try:
            data["teachers"] = [preset_spec(n).model_dump(mode="json") for n in names]
        except (KeyError, ValueError) as e:
            raise ConfigError(f"--teachers: {e.args[0]}") from None
    if "teachers" not in data:  # materialize the default list so `--set teachers.0.runtime...` works
        data["teachers"] = [preset_spec(n).model_dump(mode="json") for n in DEFAULT_TEACHERS]
    if views is not None:
        data.setdefault("source", {})["views"] = views
    if limit is not None:
        data.setdefault("source", {})["limit"] = limit
    apply_overrides(data, overrides, CacheJobConfig)
    if "url" not in data.get("store", {}):
        raise ConfigError("no store given: pass --store PATH_OR_URL (or set store.url in the config file)")
    return validate(CacheJobConfig, data, str(config) if config else "command line")


@app.command("cache-teachers")
def cache_teachers(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML job file (see jobs/configs/).")
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(help="'sample-photos', a folder or s3:// prefix, or a .parquet/.csv list of URIs."),
    ] = None,
    store: Annotated[str | None, typer.Option(help="Store root: local path or s3://bucket/prefix.")] = None,
    teachers: Annotated[
        str | None, typer.Option(help="Comma-separated teacher presets (see `radio-dist teachers list`).")
    ] = None,
    views: Annotated[int | None, typer.Option(help="sample-photos: expand into N distinct views.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N inputs.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key.path=value (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run teachers once per image and write PHI-S targets to the store (resumes an interrupted run)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from radio_dist.cache.pipeline import run_cache
    from radio_dist.sources import SourceError
    from radio_dist.store import StoreError

    try:
        cfg = build_cache_config(config, source, store, teachers, views, limit, set_ or [])
    except ConfigError as e:
        _fail(str(e))
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )
    task = None

    def on_event(kind: str, ev: dict[str, Any]) -> None:
        nonlocal task
        if kind == "warning":
            err.print(f"warning: {ev['message']}", highlight=False)
        elif kind == "listed":
            err.print(f"listed {ev['items']} inputs from {cfg.source.kind.value} source", highlight=False)
        elif kind == "todo":
            err.print(
                f"to cache: {ev['todo']}  (already in store: {ev['skipped']}, duplicate content: {ev['duplicates']})",
                highlight=False,
            )
            if ev["todo"]:
                progress.start()
                task = progress.add_task("caching", total=ev["todo"], info="")
        elif kind == "phis":
            disp = "n/a" if ev["dispersion"] is None else f"{ev['dispersion']:.3f}"
            progress.console.print(
                f"PHI-S fitted for {ev['teacher']}: {ev['rotation']} rotation, alpha={ev['alpha']:.4g}, "
                f"summary dispersion={disp}",
                highlight=False,
            )
        elif kind == "shard" and task is not None:
            progress.update(
                task,
                completed=ev["ok"] + ev["error"],
                info=f"ok {ev['ok']} err {ev['error']} {ev['bytes'] / 1e6:.1f} MB",
            )

    if as_json:  # stdout is the JSON summary alone: Ray's worker logs and notices go to stderr
        cfg.ray.log_to_driver = False
        _json_only_stdout()
    try:
        summary = run_cache(cfg, on_event)
    except (SourceError, StoreError, ConfigError) as e:
        progress.stop()
        _fail(str(e))
    finally:
        progress.stop()
    if as_json:
        _print_json({"store": cfg.store.url, **summary.to_dict()})
        return
    t = Table(title=f"cache-teachers -> {cfg.store.url}", show_header=False)
    t.add_row("images ok / error / skipped", f"{summary.ok} / {summary.error} / {summary.skipped}")
    t.add_row("duplicate content dropped", str(summary.duplicates))
    t.add_row("images/s (pipeline)", f"{summary.images_per_s:.1f}")
    t.add_row("bytes written", f"{summary.bytes_written / 1e6:.2f} MB in {summary.shards} shard(s)")
    for name, fw in summary.teacher_forwards.items():
        t.add_row(f"teacher {name}", f"{fw['images']} images in {fw['calls']} forward calls")
    t.add_row("wall time", f"{summary.seconds:.1f} s")
    out.print(t)
    for row in summary.errors[:10]:
        err.print(f"  error row: {row['error']}", highlight=False)


@teachers_app.command("list")
def teachers_list(as_json: JsonOpt = False) -> None:
    """Registered teacher families and their ready-to-run presets."""
    from radio_dist.teacher import registered_teachers

    rows = []
    for fam, entry in sorted(registered_teachers().items()):
        preset = entry.default_spec() if entry.default_spec else None
        rows.append(
            {"family": fam, "preset": preset.name if preset else None, "description": entry.description}
        )
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    t = Table("family", "preset (store name)", "description")
    for r in rows:
        t.add_row(r["family"], r["preset"] or "- (needs a weights file)", r["description"])
    out.print(t)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _open_store(url: str) -> Any:
    from radio_dist.store import FeatureStore, StoreError

    store = FeatureStore(url)
    try:
        store.meta()
    except StoreError as e:
        _fail(str(e))
    return store


@store_app.command("info")
def store_info_cmd(store: StoreArg, as_json: JsonOpt = False) -> None:
    """Rows ok/error, teachers, shapes, bytes per image."""
    from radio_dist.store import store_info

    info = store_info(_open_store(store))
    if as_json:
        print(json.dumps(info, indent=1))
        return
    t = Table(title=f"store {info['url']}", show_header=False)
    t.add_row("rows ok / error", f"{info['rows_ok']} / {info['rows_error']}")
    t.add_row("shards (orphans)", f"{info['shards']} ({info['orphan_shards']})")
    t.add_row("partitions", ", ".join(f"{k}={v}px" for k, v in info["partitions"].items()))
    t.add_row("view resampling", str(info["view_resample"]))
    for name, ti in info["teachers"].items():
        shapes = "; ".join(
            f"{p}: dense {tuple(o['dense'])}, summary {tuple(o['summary']) if o['summary'] else '-'}"
            for p, o in ti["outputs"].items()
        )
        t.add_row(
            f"teacher {name}",
            f"{ti['family']} {ti['fingerprint'][:12]}  {shapes}  "
            f"PHI-S {ti['phis_rotation']}  disp {_fmt(ti['summary_dispersion'])}",
        )
    t.add_row("bytes per image", f"{info['bytes_per_image'] / 1e3:.1f} kB")
    t.add_row("bytes total", f"{info['bytes_total'] / 1e6:.2f} MB")
    out.print(t)


@store_app.command("verify")
def store_verify_cmd(
    store: StoreArg,
    data: Annotated[bool, typer.Option(help="Recompute every row's checksum (reads all data).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Checksums, counts, uniqueness, shapes, PHI-S files; exits non-zero on any problem."""
    from radio_dist.store import verify_store

    report = verify_store(_open_store(store), check_data=data)
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        for p in report["problems"]:
            err.print(f"[red]problem:[/] {p}", highlight=False)
        for n in report["notes"]:
            err.print(f"note: {n}", highlight=False)
        state = "[green]OK[/]" if report["ok"] else "[red]FAILED[/]"
        out.print(
            f"{state}: {report['rows']} rows, {report['unique_ids']} unique ids, {report['shards']} shards, "
            f"{report['rows_checksummed']} rows checksummed",
            highlight=False,
        )
    if not report["ok"]:
        raise typer.Exit(1)


def _print_result(title: str, res: dict[str, Any], as_json: bool) -> None:
    """A benchmark's result: JSON on stdout, or a two-column table."""
    if as_json:
        _print_json(res)
        return
    t = Table(title=title, show_header=False)
    for k, v in res.items():
        t.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    out.print(t)


@bench_app.command("cache")
def bench_cache_cmd(
    images: Annotated[int, typer.Option(help="Images in the run (sample-photo views).")] = 1024,
    fit_images: Annotated[
        int, typer.Option(help="PHI-S fit sample (its one-time phase is timed apart).")
    ] = 64,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Teacher batch size, same for both measurements "
            "(default: 32; with --config each teacher's runtime.batch_size)."
        ),
    ] = None,
    resolution: Annotated[
        int, typer.Option(help="Canonical view / teacher input size (px) of the one partition, low.")
    ] = 224,
    teachers: Annotated[
        str | None,
        typer.Option(help="Comma-separated teacher presets (default: efficientnet_lite0,mobilenet_v2)."),
    ] = None,
    seed_teachers: Annotated[
        bool,
        typer.Option(
            "--seed-teachers",
            help="DINOv3, SigLIP2 and SAM3 tiny presets at low 64 / high 128 px; reports model inputs per "
            "image with and without SAM3's mosaic.",
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Cache job YAML: bench its teachers: and pipeline.partitions (real weights; a teacher runs "
            "on CUDA where its runtime.num_gpus > 0).",
        ),
    ] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="Where the benchmark store goes (default: a temp dir).")
    ] = None,
    repeats: Annotated[
        int,
        typer.Option(
            min=1,
            help="Alternate limit and pipeline this many times (a fresh store each) and report the run with "
            "the median ratio; every run's ratio is in ratio_each.",
        ),
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Teacher-only forward loop vs the full caching pipeline on the same images."""
    from radio_dist.bench.cache import bench_cache, config_teachers

    if (teachers is not None) + seed_teachers + (config is not None) > 1:
        _fail("pass at most one of --teachers, --seed-teachers, --config")
    names = [n.strip() for n in teachers.split(",") if n.strip()] if teachers is not None else None
    try:
        specs, partitions = config_teachers(config) if config is not None else (names, None)
        if as_json:
            _json_only_stdout()
        res = bench_cache(
            images=images,
            batch_size=batch_size if batch_size is not None or config is not None else 32,
            resolution=resolution,
            fit_images=fit_images,
            workdir=workdir,
            teachers=specs,
            partitions=partitions,
            seed=seed_teachers,
            log=lambda m: err.print(m, highlight=False),
            repeats=repeats,
        )
    except ConfigError as e:
        _fail(str(e))
    _print_result("bench cache", res, as_json)


@bench_app.command("ingest")
def bench_ingest_cmd(
    store: Annotated[
        str | None,
        typer.Option(help="Bench this store (default: a fresh one with random demo-shaped targets)."),
    ] = None,
    images: Annotated[int, typer.Option(help="Images in the generated store.")] = 1024,
    batch_size: Annotated[int, typer.Option(help="Samples per step.")] = 32,
    steps: Annotated[int, typer.Option(help="Timed training steps per measurement.")] = 6,
    as_json: JsonOpt = False,
) -> None:
    """Store reader vs raw reads of the same bytes; S students trained together vs one by one."""
    from radio_dist.bench.ingest import bench_ingest

    if as_json:
        _json_only_stdout()
    res = bench_ingest(
        store_url=store,
        images=images,
        batch_size=batch_size,
        steps=steps,
        log=lambda m: err.print(m, highlight=False),
    )
    _print_result("bench ingest", res, as_json)


def _train_with_progress(
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
        _json_only_stdout()
    try:
        return run(None if as_json else on_metrics)
    except errors as e:
        progress.stop()  # before the message, so the bar does not redraw over it
        _fail(str(e))
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


@app.command("distill")
def distill_cmd(
    store: Annotated[
        str | None, typer.Option(help="Feature store to train from (local path or s3://).")
    ] = None,
    out_dir: Annotated[
        str | None,
        typer.Option("--out", help="Run directory: checkpoints, metrics.jsonl, exported students."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML job file (see jobs/configs/).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key.path=value (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train every student at once from the cached targets (resumes from OUT's last checkpoint)."""
    from radio_dist.train.distill import run_distill
    from radio_dist.store import StoreError

    try:
        cfg = build_distill_config(config, store, out_dir, set_ or [])
    except ConfigError as e:
        _fail(str(e))

    def info(m: dict[str, Any]) -> str:
        losses = "  ".join(
            f"{s.name} {m[f'{s.name}/total']:.3f}" for s in cfg.students if f"{s.name}/total" in m
        )
        return f"epoch {m['epoch']} {m['resolution']}px  {losses}"

    summary = _train_with_progress(
        "distill",
        lambda follow: run_distill(cfg, follow),
        "global_step",
        info,
        as_json,
        (StoreError, ConfigError),
    )
    if as_json:
        _print_json(summary)
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


def build_featsharp_config(config: Path | None, out_dir: str | None, overrides: list[str]) -> Any:
    from radio_dist.featsharp.train import FeatSharpConfig

    data = read_yaml(config) if config else {}
    if out_dir is not None:
        data["out"] = out_dir
    apply_overrides(data, overrides, FeatSharpConfig)
    if "teacher" not in data:
        raise ConfigError(
            "no teacher given: set `teacher` in the config file (a spec or a preset name) or --set teacher=NAME"
        )
    return validate(FeatSharpConfig, data, str(config) if config else "command line")


@featsharp_app.command("train")
def featsharp_train_cmd(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML job file (see jobs/configs/featsharp_sample.yaml)."),
    ] = None,
    out_dir: Annotated[
        str | None,
        typer.Option("--out", help="Run directory: checkpoints, featsharp.safetensors, report.json."),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key.path=value (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train FeatSharp with Ray Train (resumes from OUT's last checkpoint); reports held-out error vs bilinear."""
    from radio_dist.featsharp.train import run_featsharp

    try:
        cfg = build_featsharp_config(config, out_dir, set_ or [])
    except ConfigError as e:
        _fail(str(e))
    summary = _train_with_progress(
        "featsharp",
        lambda follow: run_featsharp(cfg, follow),
        "step",
        lambda m: f"loss {m['loss']:.4f}  {m['step_s']:.2f} s/step",
        as_json,
        (ConfigError, FileNotFoundError, ValueError),
    )
    if as_json:
        _print_json(summary)
        return
    _print_featsharp_report(f"featsharp -> {summary['featsharp']}", summary["report"])
    out.print(f"steps {summary['steps']}, final loss {summary['final_loss']:.4f}, {summary['wall_s']:.1f} s")


def _print_featsharp_report(title: str, r: dict[str, Any]) -> None:
    t = Table(title=title, caption=f"{r['images']} held-out images x {r['jitters']} jitters, PHI-S space")
    t.add_column("upsampler")
    t.add_column("MSE vs teacher on jittered views", justify="right")
    t.add_column("cosine", justify="right")
    t.add_row("FeatSharp", f"{r['featsharp_mse']:.4f}", f"{r['featsharp_cos']:.4f}")
    t.add_row("bilinear", f"{r['bilinear_mse']:.4f}", f"{r['bilinear_cos']:.4f}")
    out.print(t)


@featsharp_app.command("eval")
def featsharp_eval_cmd(
    path: Annotated[str, typer.Argument(help="A FeatSharp file (OUT/featsharp.safetensors).")],
    source: Annotated[
        str, typer.Option(help="Photos: 'sample-photos', a folder / s3:// prefix, or a .parquet/.csv list.")
    ] = "sample-photos",
    views: Annotated[int, typer.Option(help="sample-photos: views to draw from.")] = 96,
    images: Annotated[int, typer.Option(help="Images to evaluate on.")] = 16,
    jitters: Annotated[int, typer.Option(help="Jittered views per image.")] = 8,
    any_photos: Annotated[
        bool, typer.Option("--any-photos", help="Use any photo of the source, not only the held-out ones.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Held-out consistency error of a FeatSharp file next to bilinear upsampling."""
    from radio_dist.featsharp.report import evaluate_file
    from radio_dist.sources import SourceConfig

    src = source_from_arg(source)
    if src["kind"] == "sample-photos":
        src["views"] = views
    try:
        res = evaluate_file(
            path, SourceConfig(**src), images=images, jitters=jitters, held_out_only=not any_photos
        )
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if as_json:
        _print_json(res)
        return
    _print_featsharp_report(path, res)


@app.command("eval")
def eval_cmd(
    run: Annotated[str, typer.Argument(help="A distill run directory (its students/ are evaluated).")],
    store: Annotated[str, typer.Option(help="The store the students were trained from (teachers, PHI-S).")],
    images: Annotated[int, typer.Option(help="Held-out images (sample-photo views not in the store).")] = 16,
    views: Annotated[int, typer.Option(help="Sample-photo views to draw held-out images from.")] = 256,
    resolutions: Annotated[
        str | None,
        typer.Option(help="Comma-separated student resolutions (default 0.5x/1x/1.5x partitions)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Cosine fidelity of each student to each teacher on held-out images, at several resolutions."""
    from radio_dist.train.evaluate import EvalConfig, evaluate, load_students
    from radio_dist.sources import SourceConfig
    from radio_dist.store import FeatureStore, StoreError

    root = Path(run) / "students"
    paths = sorted(str(p) for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []
    if not paths:
        _fail(f"{run}: no exported students under {root} — run `radio-dist distill --out {run}` first")
    if as_json:
        _json_only_stdout()
    try:
        res_list = [int(r) for r in resolutions.split(",")] if resolutions else None
        cfg = EvalConfig(source=SourceConfig(views=views), images=images, resolutions=res_list)
        result = evaluate(FeatureStore(store), load_students(paths), cfg, progress=lambda m: err.print(m))
    except (StoreError, ValueError) as e:
        _fail(str(e))
    if as_json:
        _print_json(result)
        return
    t = Table(
        title=f"fidelity on {result['images']} held-out images (cosine to the teacher; untrained in ())"
    )
    t.add_column("student")
    t.add_column("teacher")
    for r in result["resolutions"]:
        t.add_column(f"{r}px dense / summary")
    for name, per_t in result["students"].items():
        for teacher, per_r in per_t.items():
            cells = []
            for r in result["resolutions"]:
                m = per_r.get(str(r), {})
                u = result["untrained"].get(name, {}).get(teacher, {}).get(str(r), {})
                cells.append(
                    f"{_fmt(m.get('dense_cos'))} ({_fmt(u.get('dense_cos'))}) / "
                    f"{_fmt(m.get('summary_cos'))} ({_fmt(u.get('summary_cos'))})"
                )
            t.add_row(name, teacher, *cells)
    for teacher, per_px in result.get("mean_predictor", {}).get("mean", {}).items():
        floor: dict[str, float] = next(iter(per_px.values()), {})  # the average cached target: the floor
        cell = f"{_fmt(floor.get('dense_cos'))} / {_fmt(floor.get('summary_cos'))}"
        t.add_row("(store mean)", teacher, *[cell] * len(result["resolutions"]))
    out.print(t)


@app.command("submit")
def submit_cmd(
    job: Annotated[str, typer.Argument(help="Which job: cache_teachers | distill.")],
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML job file (validated before upload).")],
    address: Annotated[
        str | None,
        typer.Option(help="Ray dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)."),
    ] = None,
    working_dir: Annotated[
        Path | None,
        typer.Option(help="Uploaded as the job's working_dir (default: the runtime_env's, else '.')."),
    ] = None,
    runtime_env: Annotated[
        Path | None, typer.Option(help="A runtime_env YAML (e.g. deploy/runtime_env.yaml) to start from.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key.path=value (repeatable).")
    ] = None,
    follow: Annotated[bool, typer.Option(help="Stream the job's logs until it ends.")] = True,
) -> None:
    """Submit a radio-dist job to a Ray cluster; exits with the job's outcome (0 = SUCCEEDED)."""
    from radio_dist.submit import JobName, build_submission, default_address, submit_and_follow

    try:
        name = JobName(job)
    except ValueError:
        _fail(f"unknown job {job!r}: choose one of {[j.value for j in JobName]}")
    try:
        submission = build_submission(name, config, set_ or [], working_dir, runtime_env)
    except ConfigError as e:
        _fail(str(e))
    addr = address or default_address()
    try:
        job_id, status = submit_and_follow(
            addr, submission, follow=follow, log=lambda m: err.print(m, highlight=False, markup=False)
        )
    except ConnectionError as e:
        _fail(f"cannot reach the Ray cluster at {addr}: {e} — is the head running (`ray start --head`)?")
    out.print(f"{job_id} {status}")
    if follow and status != "SUCCEEDED":
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
