"""Ray job entrypoint for multi-student distillation from a feature store.

    python -m jobs.distill --config jobs/configs/distill_sample.yaml --set store.url=./store --set out=./runs/demo
    ray job submit --working-dir . -- python -m jobs.distill --config jobs/configs/distill_sample.yaml

Inside a Ray job, RAY_ADDRESS is set, so Ray Train joins the cluster instead of starting one. Re-submitting
the same job (same `out`) resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json

from radio_dist.config import load_model
from radio_dist.train.config import DistillConfig
from radio_dist.train.distill import run_distill


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML job file")
    ap.add_argument("--set", action="append", default=[], help="override key.path=value (repeatable)")
    args = ap.parse_args(argv)
    cfg = load_model(DistillConfig, args.config, args.set)
    summary = run_distill(cfg)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
