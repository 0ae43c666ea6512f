"""`radio-dist plan`: the bill of a job before it runs (FLOPs, GPU-hours, bytes, bandwidth)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from radio_dist.cli.common import JsonOpt, SetOpt, fail, out, print_json
from radio_dist.config import ConfigError

DEFAULT_IMAGES = 1_000_000


def plan_cmd(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The job's YAML file (cache, distill or featsharp).")
    ],
    images: Annotated[
        int | None,
        typer.Option(
            "--images",
            min=1,
            help=f"Images the job covers (default {DEFAULT_IMAGES:,}; a distill job over an existing store: its rows).",
        ),
    ] = None,
    gpu_name: Annotated[str, typer.Option("--gpu", help="GPU whose datasheet bf16 rate is used.")] = "H100",
    mfu: Annotated[float, typer.Option("--mfu", help="Model FLOPs utilization assumed (a fraction).")] = 0.4,
    peak_tflops: Annotated[
        float | None, typer.Option("--peak-tflops", help="Dense bf16 TFLOP/s of a GPU the table lacks.")
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="distill jobs: the caching job that builds the store (its teachers, partitions and codecs); "
            "default: read the existing store",
        ),
    ] = None,
    job: Annotated[
        str | None, typer.Option("--job", help="cache | distill | featsharp (default: from the keys).")
    ] = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What a job will cost, before it runs: FLOPs, GPU-hours, bytes stored, bandwidth needed."""
    from radio_dist import costs
    from radio_dist.cache.config import CacheJobConfig
    from radio_dist.config import load_model, read_yaml
    from radio_dist.featsharp.train import FeatSharpConfig
    from radio_dist.train.config import DistillConfig

    try:
        kind = job or costs.job_kind(read_yaml(config))
        if kind not in ("cache", "distill", "featsharp"):
            fail(f"--job {kind!r}: use cache, distill or featsharp")
        g = costs.gpu(gpu_name, mfu, peak_tflops)
        if kind == "cache":
            res = costs.plan_cache(
                load_model(CacheJobConfig, config, set_ or []), images or DEFAULT_IMAGES, g
            )
        elif kind == "featsharp":
            res = costs.plan_featsharp(load_model(FeatSharpConfig, config, set_ or []), g)
        else:
            cfg = load_model(DistillConfig, config, set_ or [])
            shape, n = distill_shape(cfg, cache)
            res = costs.plan_distill(cfg, shape, images or n or DEFAULT_IMAGES, g)
    except (costs.PlanError, ConfigError) as e:
        fail(str(e))
    res["config"] = str(config)
    if as_json:
        print_json(res)
        return
    {"cache": show_cache, "distill": show_distill, "featsharp": show_featsharp}[kind](res)


def distill_shape(cfg: Any, cache: Path | None) -> tuple[Any, int | None]:
    """The store's shape for a distill plan: from the caching job, else from the store itself (and its rows)."""
    from radio_dist import costs
    from radio_dist.cache.config import CacheJobConfig
    from radio_dist.config import load_model
    from radio_dist.store import FeatureStore, StoreError

    if cache is not None:
        return costs.cache_shape(load_model(CacheJobConfig, cache)), None
    store = FeatureStore.from_config(cfg.store)
    try:
        if not store.exists():
            raise costs.PlanError(
                f"store {cfg.store.url} does not exist yet: give --cache CACHE_JOB.yaml, the caching job that "
                "will build it, so the plan knows its teachers, partitions and codecs"
            )
        return costs.store_shape(store.meta()), len(store.committed_ids()) or None
    except StoreError as e:
        raise costs.PlanError(str(e)) from None


def tb(x: float) -> str:
    """Bytes in the unit that reads best."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:,.0f}" if abs(x) >= 10**digits else f"{x:.{digits}g}"


def flop(tflop: float) -> str:
    for unit, scale in (("T", 1.0), ("G", 1e-3), ("M", 1e-6)):
        if tflop >= scale:
            return f"{tflop / scale:.3g} {unit}"
    return f"{tflop * 1e12:.3g}"


def gpu_line(res: dict[str, Any]) -> str:
    g = res["gpu"]
    return f"{g['name']} at {g['peak_tflops']:.0f} TFLOP/s bf16 × MFU {g['mfu']:.2f} (stated, not measured)"


def show_cache(res: dict[str, Any]) -> None:
    out.print(
        f"[bold]cache-teachers[/] {res['config']}: {res['images']:,} images × {res['rows_per_image']} view(s) = "
        f"{res['rows']:,} rows; {gpu_line(res)}"
    )
    t = Table(title="per teacher and partition, one row")
    for c in ("teacher", "input", "targets", "FLOP", "GPU-h", "stored"):
        t.add_column(c, justify="left" if c in ("teacher", "stored") else "right")
    notes = []
    for e in res["teachers"]:
        h, w, c = e["dense"]
        mark = ""
        if e["note"]:
            notes.append(e["note"])
            mark = "*" * len(notes)
        t.add_row(
            f"{e['teacher']} {e['partition']}",
            f"{e['input_px']}{mark}",
            f"{h}×{w}×{c}" + (f"+{e['summary_dim']}" if e["summary_dim"] else ""),
            flop(e["tflop_per_row"]),
            num(e["gpu_hours"]),
            f"{e['codec']} {tb(e['bytes_per_row'])}",
        )
    out.print(t)
    for i, n in enumerate(notes, 1):
        out.print(f"{'*' * i} {n}")
    v = Table(title="canonical views (one row)")
    for c in ("partition", "codec", "bytes", "raw"):
        v.add_column(c)
    for p, e in res["views"].items():
        v.add_row(
            p,
            e["codec"],
            tb(e["bytes_per_row"]) if e["bytes_per_row"] is not None else "not estimated",
            tb(e["raw_bytes_per_row"]),
        )
    out.print(v)
    pi = res["per_image"]
    s = Table(title=f"the job: {res['images']:,} images", show_header=False)
    s.add_row("forward per image", f"{num(pi['tflop'])} TFLOP")
    s.add_row("GPU-hours", num(pi["gpu_hours_total"]))
    s.add_row(
        "stored per image",
        f"{tb(pi['bytes'])} ({tb(pi['target_bytes'])} targets, {tb(pi['view_bytes'])} views)",
    )
    s.add_row("stored in total", tb(res["total_bytes"]))
    s.add_row(
        "in total, every target in",
        ", ".join(f"{c} {tb(b)}" for c, b in res["total_bytes_by_codec"].items()),
    )
    for p in res["pools"]:
        rate = f"{num(p['rows_per_s'])} rows/s" if p["rows_per_s"] else "no GPUs (CPU pool)"
        s.add_row(f"pool {p['teacher']}", f"{num(p['gpus'])} GPU(s), {num(p['gpu_hours'])} GPU-h, {rate}")
    pl = res["pipeline"]
    if "rows_per_s" in pl:
        s.add_row(
            "pipeline",
            f"{num(pl['rows_per_s'])} rows/s (bound by {pl['bottleneck']}), {num(pl['wall_hours'])} h wall, "
            f"writes {tb(pl['write_bytes_per_s'])}/s",
        )
        s.add_row(
            f"same {num(pl['gpus'])} GPUs balanced",
            f"{num(pl['balanced_rows_per_s'])} rows/s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in pl["balanced_gpus"].items()),
        )
    out.print(s)


def show_distill(res: dict[str, Any]) -> None:
    out.print(
        f"[bold]distill[/] {res['config']}: {res['images']:,} images, {res['epochs']} epoch(s), "
        f"{res['steps']:,} steps of {res['global_batch']} ({res['workers']} worker(s)); {gpu_line(res)}"
    )
    mix = ", ".join(f"{r['partition']} {r['px']} px {r['probability']:.2f}" for r in res["resolutions"])
    out.print(f"resolutions per step: {mix}")
    t = Table(title="per student (training = 3× forward" + (" + MESA's EMA forward)" if res["mesa"] else ")"))
    for c in ("student", "arch", "parallel", "TFLOP/sample", "TFLOP/step", "GPU-h"):
        t.add_column(c, justify="left" if c in ("student", "arch", "parallel") else "right")
    for s in res["students"]:
        t.add_row(
            s["student"],
            f"{s['kind']} {s['arch']}",
            s["parallel"],
            num(s["tflop_per_sample"]),
            num(s["tflop_per_step"]),
            num(s["gpu_hours"]),
        )
    out.print(t)
    r = Table(title="reads per GPU")
    for c in ("partition", "bytes/sample", "samples/s", "read/s"):
        r.add_column(c, justify="right")
    for p, e in res["reads"].items():
        r.add_row(
            p,
            tb(e["bytes_per_sample"]),
            num(e["samples_per_s_per_gpu"]),
            tb(e["read_bytes_per_s_per_gpu"]) + "/s",
        )
    out.print(r)
    c = res["cached_vs_online"]
    s = Table(title="the job", show_header=False)
    s.add_row("GPU-hours (all students)", num(res["gpu_hours"]))
    s.add_row("wall-clock", f"{num(res['wall_hours'])} h on {res['workers']} GPU(s)")
    s.add_row(
        "read bandwidth per GPU", f"{tb(res['read_bytes_per_s_per_gpu'])}/s (mean over the resolution mix)"
    )
    if res["live_teachers"]:
        s.add_row(
            "live teachers",
            f"{', '.join(res['live_teachers'])}: {num(res['live_tflop_per_sample'])} TFLOP/sample",
        )
    s.add_row(
        f"online / cached over {c['epochs']} epoch(s)",
        f"{num(c['online_over_cached'])}× (teachers {num(c['teacher_tflop_per_row_cached'])} TFLOP/row cached, "
        f"{num(c['teacher_tflop_per_sample_online'])} per sample online; students {num(c['students_tflop_per_sample'])})",
    )
    out.print(s)


def show_featsharp(res: dict[str, Any]) -> None:
    s = Table(title=f"featsharp {res['config']}", show_header=False)
    s.add_row("GPU", gpu_line(res))
    s.add_row("teacher", f"{res['teacher']} at {res['low_px']} px, ×{res['factor']}")
    s.add_row("teacher forwards per image", str(res["teacher_forwards_per_image"]))
    s.add_row(
        "TFLOP per forward / per step",
        f"{num(res['tflop_per_teacher_forward'])} / {num(res['tflop_per_step'])}",
    )
    s.add_row("steps", f"{res['steps']:,}")
    s.add_row("GPU-hours", f"{num(res['gpu_hours'])} ({res['note']})")
    s.add_row("wall-clock", f"{num(res['wall_hours'])} h")
    out.print(s)
