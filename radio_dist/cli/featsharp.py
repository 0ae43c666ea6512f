"""`radio-dist featsharp train` and `featsharp eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from radio_dist.cli.common import JsonOpt, SetOpt, fail, out, print_json, source_from_arg
from radio_dist.cli.train import train_with_progress
from radio_dist.config import ConfigError, apply_overrides, read_yaml, validate


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


def featsharp_train_cmd(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML job file (see jobs/configs/featsharp_sample.yaml)."),
    ] = None,
    out_dir: Annotated[
        str | None,
        typer.Option("--out", help="Run directory: checkpoints, featsharp.safetensors, report.json."),
    ] = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train FeatSharp with Ray Train (resumes from OUT's last checkpoint); reports held-out error vs bilinear."""
    from radio_dist.featsharp.train import run_featsharp

    try:
        cfg = build_featsharp_config(config, out_dir, set_ or [])
    except ConfigError as e:
        fail(str(e))
    summary = train_with_progress(
        "featsharp",
        lambda follow: run_featsharp(cfg, follow),
        "step",
        lambda m: f"loss {m['loss']:.4f}  {m['step_s']:.2f} s/step",
        as_json,
        (ConfigError, FileNotFoundError, ValueError),
    )
    if as_json:
        print_json(summary)
        return
    print_featsharp_report(f"featsharp -> {summary['featsharp']}", summary["report"])
    out.print(f"steps {summary['steps']}, final loss {summary['final_loss']:.4f}, {summary['wall_s']:.1f} s")


def print_featsharp_report(title: str, r: dict[str, Any]) -> None:
    t = Table(title=title, caption=f"{r['images']} held-out images x {r['jitters']} jitters, PHI-S space")
    t.add_column("upsampler")
    t.add_column("MSE vs teacher on jittered views", justify="right")
    t.add_column("cosine", justify="right")
    t.add_row("FeatSharp", f"{r['featsharp_mse']:.4f}", f"{r['featsharp_cos']:.4f}")
    t.add_row("bilinear", f"{r['bilinear_mse']:.4f}", f"{r['bilinear_cos']:.4f}")
    out.print(t)


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
        fail(str(e))
    if as_json:
        print_json(res)
        return
    print_featsharp_report(path, res)
