"""The `radio-dist` command line: one module per group of commands, composed here.

radio-dist cache-teachers --store ./store                       # built-in photos, two real teachers, local Ray
radio-dist cache-teachers --config jobs/configs/cache_sample.yaml --set store.shard_size=64
radio-dist cache-teachers --source ./photos --store s3://bucket/store --teachers efficientnet_lite0
radio-dist teachers list
radio-dist store info ./store [--json]
radio-dist store verify ./store
radio-dist store gc ./store [--dry-run]
radio-dist store recode ./store ./store-nf4 --codec nf4          # re-encode targets, no teacher runs again
radio-dist bench cache --json
radio-dist distill --store ./store --out ./runs/demo            # C-RADIO + 2 smaller students, local Ray Train
radio-dist distill --config jobs/configs/distill_sample.yaml --set train.epochs=4
radio-dist eval ./runs/demo --store ./store --pictures ./runs/demo/pictures   # held-out photos, PNGs
radio-dist probe ./runs/demo --store ./store --dataset digits             # kNN / logreg on summaries
radio-dist featsharp train --config jobs/configs/featsharp_sample.yaml --out ./runs/featsharp
radio-dist bench ingest --json
radio-dist bench manifest --shards 10000,100000,1000000   # opening a store of a million shards
radio-dist plan --config jobs/configs/cradio_v4_cache.yaml --images 100000000   # the bill before the run
radio-dist submit distill --config jobs/configs/distill_sample.yaml --address http://HEAD:8265 --set out=s3://b/run
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from radio_dist.cli import bench, cache, experiment, failing, featsharp, plan, store, submit, train
from radio_dist.config import DEBUG_ENV

app = typer.Typer(
    cls=failing.ReportingGroup,  # a failure: one line naming the resource and what to do (radio_dist.failures)
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # main() tells failures in one line; --debug prints the plain traceback
    help="Cache vision teachers; distill students.",
)
teachers_app = typer.Typer(no_args_is_help=True, help="Registered teacher families.")
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature store.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (figures in the README).")
featsharp_app = typer.Typer(
    cls=failing.ReportingGroup,  # a failure: one line naming the resource and what to do (radio_dist.failures)
    no_args_is_help=True,
    help="FeatSharp: the learned upsampler of a low-resolution teacher (SigLIP2).",
)
app.add_typer(teachers_app, name="teachers")
app.add_typer(store_app, name="store")
app.add_typer(bench_app, name="bench")
app.add_typer(featsharp_app, name="featsharp")

app.command("cache-teachers")(cache.cache_teachers)
teachers_app.command("list")(cache.teachers_list)
store_app.command("info")(store.store_info_cmd)
store_app.command("verify")(store.store_verify_cmd)
store_app.command("gc")(store.store_gc_cmd)
store_app.command("recode")(store.store_recode_cmd)
store_app.command("compact")(store.store_compact_cmd)
store_app.command("audit")(store.store_audit_cmd)
app.command("distill")(train.distill_cmd)
app.command("eval")(train.eval_cmd)
app.command("probe")(train.probe_cmd)
app.command("experiment")(experiment.experiment_cmd)
featsharp_app.command("train")(featsharp.featsharp_train_cmd)
featsharp_app.command("eval")(featsharp.featsharp_eval_cmd)
bench_app.command("cache")(bench.bench_cache_cmd)
bench_app.command("ingest")(bench.bench_ingest_cmd)
bench_app.command("train")(bench.bench_train_cmd)
bench_app.command("manifest")(bench.bench_manifest_cmd)
bench_app.command("views")(bench.bench_views_cmd)
app.command("submit")(submit.submit_cmd)
app.command("plan")(plan.plan_cmd)


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help=f"On a failure print the full traceback too (or set {DEBUG_ENV}=1); it is always kept "
            "in the log file the error line names.",
        ),
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


def main() -> None:
    """The ``radio-dist`` console script: every command above (failures are told by ``ReportingGroup``)."""
    try:
        app()
    except KeyboardInterrupt:
        failing.interrupted()
