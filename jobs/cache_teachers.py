"""Ray job entrypoint for teacher caching.

    python -m jobs.cache_teachers --config jobs/configs/cache_sample.yaml --set store.url=./store
    ray job submit --working-dir . -- python -m jobs.cache_teachers --config jobs/configs/cache_sample.yaml

Inside a Ray job, RAY_ADDRESS is set, so the pipeline joins the cluster instead of starting one.
"""

from __future__ import annotations

import argparse
import json

from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.pipeline import run_cache
from radio_dist.config import load_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML job file")
    ap.add_argument("--set", action="append", default=[], help="override key.path=value (repeatable)")
    args = ap.parse_args(argv)
    cfg = load_model(CacheJobConfig, args.config, args.set)
    summary = run_cache(cfg)
    print(json.dumps(summary.to_dict()))


if __name__ == "__main__":
    main()
