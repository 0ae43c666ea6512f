"""`radio-dist experiment NAME --store S --out DIR`: one of the method's claims as a controlled experiment."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from radio_dist.cli.common import JsonOpt, err, fail, json_only_stdout, out, print_json


def experiment_cmd(
    name: Annotated[
        str,
        typer.Argument(help="summary-loss | shift | resolutions | together (radio_dist.train.experiments)."),
    ],
    store: Annotated[
        str,
        typer.Option(help="The store every arm trains from (resolutions: one with two partitions)."),
    ],
    out_dir: Annotated[str, typer.Option("--out", help="Arms' runs, NAME.md and NAME.json go here.")],
    steps: Annotated[
        int | None,
        typer.Option(help="Training steps per arm (same seed and data order); default 96, shift 300.", min=1),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every arm.")] = 0,
    images: Annotated[int, typer.Option(help="Held-out views scored per arm.", min=1)] = 16,
    as_json: JsonOpt = False,
) -> None:
    """Train the experiment's arms (those already exported are reused), score them on held-out photos and
    print the table (also written to OUT/NAME.md)."""
    from radio_dist.cli.train import train_with_progress
    from radio_dist.config import ConfigError
    from radio_dist.sources import SourceError
    from radio_dist.store import StoreError
    from radio_dist.train.distill import run_distill
    from radio_dist.train.experiments import run_experiment

    def train_run(cfg: Any) -> Any:  # an arm: the distill progress bar, losses per student
        def info(m: dict[str, Any]) -> str:
            return "  ".join(
                f"{s.name} {m[f'{s.name}/total']:.3f}" for s in cfg.students if f"{s.name}/total" in m
            )

        errors = (StoreError, ConfigError)
        return train_with_progress(
            "arm", lambda follow: run_distill(cfg, follow), "global_step", info, as_json, errors
        )

    if as_json:
        json_only_stdout()
    try:
        report = run_experiment(
            name,
            store,
            out_dir,
            steps=steps,
            seed=seed,
            images=images,
            progress=lambda m: err.print(m),
            train_run=train_run,
        )
    except (StoreError, SourceError, ConfigError, ValueError) as e:
        fail(str(e))
    if as_json:
        print_json({k: v for k, v in report.items() if k != "arms"})
        return
    out.print(report["markdown"], markup=False, highlight=False, soft_wrap=True)  # table rows unwrapped
    err.print(f"wrote {out_dir}/{name}.md and {out_dir}/{name}.json")
