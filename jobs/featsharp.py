"""Ray job entrypoint for FeatSharp training (the learned upsampler of a low-resolution teacher).

    python -m jobs.featsharp --config jobs/configs/featsharp_sample.yaml --set out=./runs/featsharp
    ray job submit --working-dir . -- python -m jobs.featsharp --config jobs/configs/featsharp_sample.yaml

Inside a Ray job, RAY_ADDRESS is set, so Ray Train joins the cluster instead of starting one. Re-submitting
the same job (same `out`) resumes from its last checkpoint. The result, OUT/featsharp.safetensors, is what a
caching job's teacher spec names in `options.featsharp` (with `adaptation: featsharp`).
"""

from __future__ import annotations

from jobs import run_job
from radio_dist.featsharp.train import FeatSharpConfig, run_featsharp


def main(argv: list[str] | None = None) -> None:
    run_job(__doc__ or "", FeatSharpConfig, run_featsharp, argv)


if __name__ == "__main__":
    main()
