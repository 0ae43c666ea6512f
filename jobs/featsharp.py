"""Ray job entrypoint for FeatSharp training (the learned upsampler of a low-resolution teacher).

    python -m jobs.featsharp --config jobs/configs/featsharp_sample.yaml --set out=./runs/featsharp
    ray job submit --working-dir . -- python -m jobs.featsharp --config jobs/configs/featsharp_sample.yaml

Inside a Ray job, RAY_ADDRESS is set, so Ray Train joins the cluster instead of starting one. Re-submitting
the same job (same `out`) resumes from its last checkpoint. The result, OUT/featsharp.safetensors, is what a
caching job's teacher spec names in `options.featsharp` (with `adaptation: featsharp`).
"""

from __future__ import annotations

import argparse
import json

from radio_dist.config import load_model
from radio_dist.featsharp.train import FeatSharpConfig, run_featsharp


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML job file")
    ap.add_argument("--set", action="append", default=[], help="override key.path=value (repeatable)")
    args = ap.parse_args(argv)
    cfg = load_model(FeatSharpConfig, args.config, args.set)
    summary = run_featsharp(cfg)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
