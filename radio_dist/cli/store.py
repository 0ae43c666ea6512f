"""`radio-dist store info` and `store verify`."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from radio_dist.cli.common import JsonOpt, StoreArg, err, fail, fmt, out


def open_store(url: str) -> Any:
    from radio_dist.store import FeatureStore, StoreError

    store = FeatureStore(url)
    try:
        store.meta()
    except StoreError as e:
        fail(str(e))
    return store


def store_info_cmd(store: StoreArg, as_json: JsonOpt = False) -> None:
    """Rows ok/error, teachers, shapes, bytes per image."""
    from radio_dist.store import store_info

    info = store_info(open_store(store))
    if as_json:
        print(json.dumps(info, indent=1))
        return
    t = Table(title=f"store {info['url']}", show_header=False)
    t.add_row("rows ok / error", f"{info['rows_ok']} / {info['rows_error']}")
    t.add_row("shards (orphans)", f"{info['shards']} ({info['orphan_shards']})")
    if info["orphan_shards"] or info["temp_files"]:
        t.add_row(
            "left by interrupted writes",
            f"{info['orphan_shards']} shard dir(s), {info['temp_files']} temporary file(s), "
            f"{info['garbage_bytes'] / 1e6:.1f} MB — `radio-dist store gc {info['url']}` removes them",
        )
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
            f"PHI-S {ti['phis_rotation']}  disp {fmt(ti['summary_dispersion'])}",
        )
    t.add_row("bytes per image", f"{info['bytes_per_image'] / 1e3:.1f} kB")
    t.add_row("bytes total", f"{info['bytes_total'] / 1e6:.2f} MB")
    out.print(t)


def store_verify_cmd(
    store: StoreArg,
    data: Annotated[bool, typer.Option(help="Recompute every row's checksum (reads all data).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Checksums, counts, uniqueness, shapes, PHI-S files; exits non-zero on any problem."""
    from radio_dist.store import verify_store

    report = verify_store(open_store(store), check_data=data)
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


def store_gc_cmd(
    store: StoreArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove what interrupted writes left (uncommitted shard dirs, temporary files); never committed data.
    Refused while a job writes the store."""
    from radio_dist.store import collect_garbage

    report = collect_garbage(open_store(store), dry_run=dry_run)
    if as_json:
        print(json.dumps(report, indent=1))
        return
    verb = "would remove" if dry_run else "removed"
    for shard in report["orphan_shards"]:
        out.print(f"{verb} uncommitted shard dir shards/{shard}", highlight=False)
    for rel in report["temp_files"]:
        out.print(f"{verb} temporary file {rel}", highlight=False)
    n = len(report["orphan_shards"]) + len(report["temp_files"])
    out.print(
        f"{verb} {n} item(s), {report['bytes'] / 1e6:.1f} MB" if n else "nothing to remove", highlight=False
    )
