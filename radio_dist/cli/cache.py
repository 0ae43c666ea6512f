"""`radio-dist cache-teachers` and `radio-dist teachers list`."""

from __future__ import annotations

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
    json_only_stdout,
    out,
    print_json,
    source_from_arg,
)
from radio_dist.config import ConfigError, apply_overrides, read_yaml, validate


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


def cache_teachers(
    config: ConfigOpt = None,
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
    set_: SetOpt = None,
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
        fail(str(e))
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
        json_only_stdout()
    try:
        summary = run_cache(cfg, on_event)
    except (SourceError, StoreError, ConfigError) as e:
        progress.stop()
        fail(str(e))
    finally:
        progress.stop()
    if as_json:
        print_json({"store": cfg.store.url, **summary.to_dict()})
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


def teachers_list(as_json: JsonOpt = False) -> None:
    """Registered teacher families, their ready-to-run presets and the adaptations each can run with."""
    from radio_dist.teacher import registered_adaptations, registered_teachers

    adaptations = registered_adaptations()
    wrappers = sorted(name for name, a in adaptations.items() if a.wrap is not None)  # any family
    rows: list[dict[str, Any]] = []
    for fam, entry in sorted(registered_teachers().items()):
        preset = entry.default_spec() if entry.default_spec else None
        rows.append(
            {
                "family": fam,
                "preset": preset.name if preset else None,
                "adaptations": sorted({*entry.adaptations, *wrappers}),
                "description": entry.description,
            }
        )
    if as_json:
        print_json(rows)
        return
    t = Table("family", "preset (store name)", "adaptations", "description")
    for r in rows:
        t.add_row(
            r["family"],
            r["preset"] or "- (needs a weights file)",
            ", ".join(r["adaptations"]),
            r["description"],
        )
    out.print(t)
    for name, a in sorted(adaptations.items()):
        out.print(f"adaptation {name} (options: {', '.join(a.options)}): {a.description}", highlight=False)
