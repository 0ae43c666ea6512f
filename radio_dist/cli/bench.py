"""`radio-dist bench cache`, `bench ingest`, `bench train`, `bench manifest` and `bench views` (figures in the README and docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from radio_dist.cli.common import JsonOpt, err, fail, json_only_stdout, print_json, print_result
from radio_dist.config import ConfigError


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
        fail("pass at most one of --teachers, --seed-teachers, --config")
    names = [n.strip() for n in teachers.split(",") if n.strip()] if teachers is not None else None
    try:
        specs, partitions = config_teachers(config) if config is not None else (names, None)
        if as_json:
            json_only_stdout()
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
        fail(str(e))
    print_result("bench cache", res, as_json)


def bench_ingest_cmd(
    store: Annotated[
        str | None,
        typer.Option(help="Bench this store (default: fresh ones with random demo-shaped targets)."),
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="Images in each generated local store.")] = 1024,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per step.")] = 32,
    steps: Annotated[int, typer.Option(min=1, help="Timed training steps per measurement.")] = 6,
    codec: Annotated[
        str,
        typer.Option(
            help="Comma-separated target codecs: a generated store for each (fp16, int8, nf4, ...)."
        ),
    ] = "fp16,int8,nf4",
    s3: Annotated[
        bool,
        typer.Option("--s3", help="Also on moto's S3 server on loopback (dev extra): reader vs ranged GETs."),
    ] = False,
    s3_images: Annotated[int, typer.Option(min=1, help="Images in each store on the S3 server.")] = 256,
    repeats: Annotated[
        int, typer.Option(min=1, help="Timed passes of reader and raw read, alternating.")
    ] = 2,
    students: Annotated[
        bool, typer.Option("--students/--no-students", help="Also time students together vs alone.")
    ] = True,
    scale_rows: Annotated[
        int,
        typer.Option(
            min=0, help="Also a local store of this many C-RADIOv4-sized rows (14.6 MB each; 64 is ~1 GB)."
        ),
    ] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Store reader vs raw reads of the same bytes (per codec; local, and S3 with --s3; C-RADIOv4-sized rows
    with --scale-rows); S students trained together vs one by one."""
    from radio_dist.bench.ingest import bench_ingest
    from radio_dist.store.codecs import get_codec

    codecs = [c.strip() for c in codec.split(",") if c.strip()]
    try:
        for c in codecs:
            get_codec(c)
    except (KeyError, ValueError) as e:
        fail(f"--codec {codec!r}: {e}")
    if not codecs:
        fail("--codec: name at least one codec, e.g. fp16")
    if as_json:
        json_only_stdout()
    try:
        res = bench_ingest(
            store_url=store,
            images=images,
            batch_size=batch_size,
            steps=steps,
            log=lambda m: err.print(m, highlight=False),
            codecs=codecs,
            s3=s3,
            s3_images=s3_images,
            repeats=repeats,
            students_too=students,
            scale_rows=scale_rows,
        )
    except RuntimeError as e:
        fail(str(e))
    print_result("bench ingest", res, as_json)


def bench_train_cmd(
    images: Annotated[int, typer.Option(help="Photo views in the benchmark store.")] = 192,
    px: Annotated[
        int, typer.Option(help="View / teacher input size (px) of the store's one partition.")
    ] = 128,
    batch_size: Annotated[int, typer.Option(help="Samples per worker per step.")] = 8,
    workers: Annotated[int, typer.Option(min=1, help="Ray Train workers (DDP over gloo on CPU).")] = 2,
    epochs: Annotated[
        int, typer.Option(min=1, help="E of the cached-vs-online cost (the store pays the teachers once).")
    ] = 10,
    teachers: Annotated[
        str | None,
        typer.Option(help="Comma-separated teacher presets (default: efficientnet_lite0,mobilenet_v2)."),
    ] = None,
    repeats: Annotated[
        int,
        typer.Option(min=1, help="Measure together vs separate this many times; the median run is reported."),
    ] = 1,
    workdir: Annotated[
        Path | None, typer.Option(help="Where the store and runs go (default: a temp dir).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The trainer: S students together vs apart, data wait, cached targets vs teachers run live."""
    from radio_dist.bench.train import bench_train

    names = [n.strip() for n in teachers.split(",") if n.strip()] if teachers is not None else None
    if as_json:
        json_only_stdout()
    try:
        res = bench_train(
            images=images,
            px=px,
            batch_size=batch_size,
            workers=workers,
            epochs=epochs,
            teachers=names,
            repeats=repeats,
            workdir=workdir,
            log=lambda m: err.print(m, highlight=False),
        )
    except (ConfigError, ValueError) as e:
        fail(str(e))
    print_result("bench train", res, as_json)


def bench_manifest_cmd(
    shards: Annotated[
        str, typer.Option(help="Comma-separated store sizes in shards (each is simulated afresh).")
    ] = "10000,100000,1000000",
    rows_per_shard: Annotated[int, typer.Option(min=1, help="Manifest rows (images) per shard.")] = 4,
    fanout: Annotated[int, typer.Option(min=2, help="Compaction fanout F (store.compact_fanout).")] = 32,
    loose_up_to: Annotated[
        int,
        typer.Option(
            help="Also time the uncompacted layout (one part per shard) and its compaction up to this size."
        ),
    ] = 10_000,
    s3: Annotated[
        bool, typer.Option("--s3", help="On moto's S3 server on loopback (dev extra) instead of local disk.")
    ] = False,
    workdir: Annotated[
        Path | None, typer.Option(help="Where the local stores go (default: a temp dir).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Opening a store of 10 k … 1 M shards: manifest read, committed ids, epoch plan (simulated rows)."""
    from radio_dist.bench.manifest import format_table, run_manifest_bench

    try:
        sizes = [int(s) for s in shards.split(",") if s.strip()]
    except ValueError:
        fail(f"--shards {shards!r}: give comma-separated whole numbers, e.g. 10000,100000")
    if not sizes or min(sizes) < 1:
        fail(f"--shards {shards!r}: give at least one size of 1 shard or more")
    if as_json:
        json_only_stdout()
    try:
        report = run_manifest_bench(
            sizes, rows_per_shard=rows_per_shard, fanout=fanout, loose_up_to=loose_up_to, s3=s3,
            workdir=workdir, progress=lambda m: err.print(m, highlight=False),
        )  # fmt: skip
    except RuntimeError as e:
        fail(str(e))
    if as_json:
        print_json(report)
    else:
        print(format_table(report), end="")


def bench_views_cmd(
    sizes: Annotated[str, typer.Option(help="Comma-separated view sizes (px).")] = "224,1152",
    codec: Annotated[
        str, typer.Option(help="Comma-separated view codecs (raw, png, jpeg-Q, webp-Q).")
    ] = "raw,png,jpeg-95,jpeg-90,jpeg-75,webp-90",
    repeats: Annotated[int, typer.Option(min=1, help="Decode passes; the fastest is kept.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Bytes per stored view, decode time per view and PSNR for each view codec, on the bundled photos."""
    from radio_dist.bench.views import bench_views, format_table
    from radio_dist.store.views import get_view_codec

    try:
        px = [int(s) for s in sizes.split(",") if s.strip()]
        codecs = [get_view_codec(c.strip()).name for c in codec.split(",") if c.strip()]
    except ValueError as e:
        fail(f"--sizes {sizes!r} / --codec {codec!r}: {e}")
    if not px or min(px) < 16 or not codecs:
        fail("--sizes: sizes of 16 px or more; --codec: at least one codec")
    report = bench_views(px, codecs, repeats)
    if as_json:
        print_json(report)
    else:
        print(format_table(report), end="")
