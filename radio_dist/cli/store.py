"""`radio-dist store info`, `verify`, `gc`, `recode`, `compact` and `audit`."""

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
    m = info["manifest"]
    t.add_row(
        "manifest",
        f"{m['snapshots']} snapshot(s) + {m['parts']} part(s)"
        + (f", {m['redundant']} redundant" if m["redundant"] else ""),
    )
    if info["orphan_shards"] or info["temp_files"] or info["manifest"]["redundant"]:
        t.add_row(
            "left by interrupted writes",
            f"{info['orphan_shards']} shard dir(s), {info['temp_files']} temporary file(s), "
            f"{info['manifest']['redundant']} redundant manifest object(s), "
            f"{info['garbage_bytes'] / 1e6:.1f} MB — `radio-dist store gc {info['url']}` removes them",
        )
    t.add_row("partitions", ", ".join(f"{k}={v}px" for k, v in info["partitions"].items()))
    t.add_row("view resampling", str(info["view_resample"]))
    v = info["views"]
    t.add_row(
        "views",
        f"{v['codec']}: "
        + "; ".join(
            f"{p} {e['stored_bytes'] / 1e3:.1f} kB/view stored"
            + (f" (with padding; raw {e['raw_bytes'] / 1e3:.1f})" if v["codec"] != "raw" else "")
            for p, e in v["partitions"].items()
        ),
    )
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
        for p, tg in ti["targets"].items():
            fid = tg["fidelity"]
            measured = (
                f"cos mean {fid['cos_mean']:.5f}, p1 {fid['cos_p1']:.5f}, rel MSE {fid['rel_mse']:.1e} "
                f"(vs {fid['against']}, {fid['tokens']} tokens)"
                if fid
                else "fidelity not recorded"
            )
            t.add_row(
                f"  {name} {p} targets",
                f"{tg['codec']}: {tg['dense_bytes_per_image'] / 1e3:.1f} kB/image ({tg['vs_fp16']:.3f}x fp16); {measured}",
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
    for rel in report["redundant_manifest"]:
        out.print(f"{verb} manifest object {rel} (a snapshot holds its rows)", highlight=False)
    n = len(report["orphan_shards"]) + len(report["temp_files"]) + len(report["redundant_manifest"])
    out.print(
        f"{verb} {n} item(s), {report['bytes'] / 1e6:.1f} MB" if n else "nothing to remove", highlight=False
    )


def store_recode_cmd(
    src: Annotated[str, typer.Argument(help="The store to read (local path or s3://).")],
    dst: Annotated[str, typer.Argument(help="The store to write (new, or one an earlier recode started).")],
    codec: Annotated[
        list[str],
        typer.Option(
            "--codec",
            help="CODEC for every target, TEACHER=CODEC, or TEACHER.PARTITION=CODEC (repeat; later ones win). "
            "Codecs: fp16, int8, nf4, nf4-g32, nf4-g128.",
        ),
    ],
    workers: Annotated[int, typer.Option(min=1, help="Shards recoded at once.")] = 2,
    as_json: JsonOpt = False,
) -> None:
    """Re-encode a store's dense targets into a new store, without running the teachers; resumable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from radio_dist.store import FeatureStore
    from radio_dist.store.codecs import UnknownCodecError
    from radio_dist.store.recode import parse_codec_choices, recode_store

    source = open_store(src)
    try:
        choices = parse_codec_choices(codec, source.meta())
    except UnknownCodecError as e:
        fail(f"--codec: {e}")
    bar = Progress(
        TextColumn("[bold]recoding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err
    )
    task = None

    def on_event(kind: str, ev: dict[str, Any]) -> None:
        nonlocal task
        if kind == "todo":
            err.print(f"shards to recode: {ev['todo']} (already in {dst}: {ev['skipped']})", highlight=False)
            if ev["todo"] and not as_json:
                bar.start()
                task = bar.add_task("recode", total=ev["todo"])
        elif kind == "shard" and task is not None:
            bar.update(task, completed=ev["written"])

    try:
        summary = recode_store(source, FeatureStore(dst), choices, workers=workers, progress=on_event)
    except UnknownCodecError as e:  # a codec that cannot hold a teacher's channels
        fail(f"--codec: {e}")
    finally:
        bar.stop()
    if as_json:
        print(json.dumps(summary.to_dict(), indent=1))
        return
    if not summary.written:
        out.print(f"nothing to recode: all {summary.skipped} shard(s) are in {dst}", highlight=False)
        return
    ratio = summary.bytes_dst / summary.bytes_src if summary.bytes_src else 0.0
    out.print(
        f"recoded {summary.written} shard(s) ({summary.rows} rows), {summary.skipped} already in {dst}; "
        f"dense targets {summary.bytes_src / 1e6:.2f} MB -> {summary.bytes_dst / 1e6:.2f} MB ({ratio:.3f}x) "
        f"in {summary.seconds:.1f} s; `radio-dist store info {dst}` shows the fidelity",
        highlight=False,
    )


def store_compact_cmd(
    store: StoreArg,
    fanout: Annotated[
        int,
        typer.Option(min=2, help="Objects of one level merged into one snapshot (the store's default: 32)."),
    ] = 32,
    full: Annotated[
        bool, typer.Option("--full", help="Merge every manifest object into one snapshot.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge committed manifest parts into snapshots, so the store opens with few reads; crash-safe, and
    refused while a job writes the store."""
    from radio_dist.store.compact import compact_store

    summary = compact_store(open_store(store), fanout=fanout, full=full)
    if as_json:
        print(json.dumps(summary.to_dict(), indent=1))
        return
    out.print(
        f"manifest objects {summary.objects_before} -> {summary.objects_after}: {summary.snapshots_written} "
        f"snapshot(s) written from {summary.objects_merged} object(s) ({summary.rows_rewritten} rows), "
        f"{summary.deleted} removed, in {summary.seconds:.1f} s",
        highlight=False,
    )


def store_audit_cmd(
    store: StoreArg,
    teacher: Annotated[str, typer.Option("--teacher", "-t", help="The cached teacher to re-run live.")],
    rows: Annotated[int, typer.Option(min=1, help="Rows sampled (without replacement) from the store.")] = 16,
    partition: Annotated[
        str | None, typer.Option(help="Comma-separated partitions (default: every one the teacher has).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the row sample.")] = 0,
    weights: Annotated[
        str | None,
        typer.Option(
            help="The teacher's weights file, where it is no longer at the path the store recorded."
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.5,
            help="Cosine allowed below the fidelity recorded when the targets were written (another device or "
            "library build drifts a little).",
        ),
    ] = 0.003,
    device: Annotated[str | None, typer.Option(help="cpu | cuda (default: cuda where there is one).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-run a cached teacher live on sampled rows and compare with the stored targets; exits 1 below the
    threshold the recorded fidelity implies (wrong weights, preprocessing drift, targets written wrong)."""
    from radio_dist.cache.audit import audit_teacher

    parts = [p.strip() for p in partition.split(",") if p.strip()] if partition else None
    report = audit_teacher(
        open_store(store), teacher, rows=rows, partitions=parts, seed=seed, weights=weights,
        tolerance=tolerance, device=device, progress=lambda m: err.print(m, highlight=False),
    )  # fmt: skip
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for n in report.notes:
            err.print(f"note: {n}", highlight=False)
        out.print(
            f"audit of {report.teacher} on {report.device}, tolerance {report.tolerance}:", highlight=False
        )
        for p in report.partitions:
            r = p.recorded
            out.print(
                f"  {p.partition} {p.codec}: {p.rows} rows, cos mean {p.cos_mean:.6f} p1 {p.cos_p1:.6f}, "
                f"rel mse {p.rel_mse:.2e}; recorded "
                + ("-" if r is None else f"{r['cos_mean']:.6f} / {r['cos_p1']:.6f}")
                + ("" if p.summary_cos_min is None else f"; summary cos min {p.summary_cos_min:.6f}")
                + (" [green]ok[/]" if p.passed else " [red]FAILED[/]"),
                highlight=False,
                soft_wrap=True,
            )
        for p in report.partitions:
            for f in p.failures:
                err.print(f"[red]problem:[/] {p.partition}: {f}", highlight=False)
    if not report.passed:
        raise typer.Exit(1)
