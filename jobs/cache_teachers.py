"""Ray job entrypoint for teacher caching.

    python -m jobs.cache_teachers --config jobs/configs/cache_sample.yaml --set store.url=./store
    ray job submit --working-dir . -- python -m jobs.cache_teachers --config jobs/configs/cache_sample.yaml

Inside a Ray job, RAY_ADDRESS is set, so the pipeline joins the cluster instead of starting one.
"""

from __future__ import annotations

from jobs import run_job
from radio_dist.cache.config import CacheJobConfig
from radio_dist.cache.pipeline import run_cache


def main(argv: list[str] | None = None) -> None:
    run_job(__doc__ or "", CacheJobConfig, run_cache, argv)


if __name__ == "__main__":
    main()
