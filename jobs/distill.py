"""Ray job entrypoint for multi-student distillation from a feature store.

    python -m jobs.distill --config jobs/configs/distill_sample.yaml --set store.url=./store --set out=./runs/demo
    ray job submit --working-dir . -- python -m jobs.distill --config jobs/configs/distill_sample.yaml

Inside a Ray job, RAY_ADDRESS is set, so Ray Train joins the cluster instead of starting one. Re-submitting
the same job (same `out`) resumes from its last checkpoint.
"""

from __future__ import annotations

from jobs import run_job
from radio_dist.train.config import DistillConfig
from radio_dist.train.distill import run_distill


def main(argv: list[str] | None = None) -> None:
    run_job(__doc__ or "", DistillConfig, run_distill, argv)


if __name__ == "__main__":
    main()
