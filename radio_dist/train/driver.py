"""The driver side of every radio-dist training job: Ray Train's ``TorchTrainer`` with checkpoints in the run
directory, and the job's metrics followed while it runs (the CLI's progress bar)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from radio_dist.train.rundir import RunDir, read_metrics
from radio_dist.train.worker import ScalingSettings


def absolute_path(url: str) -> str:
    """A local path made absolute (Ray Train workers run in their own directory); URLs as they are."""
    return url if "://" in url else str(Path(url).expanduser().resolve())


def fit_with_ray_train(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    out: RunDir,
    name: str,
    scaling: ScalingSettings,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    step_key: str = "global_step",
) -> Any:
    """Run ``loop`` on Ray Train workers with checkpoints under ``out/ray`` (a local path, or the same fsspec
    filesystem — endpoint, credentials — as the rest of the run directory), following ``out/metrics.jsonl``
    into ``on_metrics`` while it runs. Shared by distillation and FeatSharp training."""
    import ray.train
    from ray.train.torch import TorchTrainer

    if out.is_local:
        storage, storage_fs = str(Path(out.root).resolve()), None
    else:
        import pyarrow.fs as pafs

        storage, storage_fs = out.root, pafs.PyFileSystem(pafs.FSSpecHandler(out.fs))
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=f"{storage.rstrip('/')}/ray",
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    stop = threading.Event()
    follower = None
    if on_metrics is not None:
        follower = threading.Thread(
            target=follow_metrics, args=(out, on_metrics, stop, step_key), daemon=True
        )
        follower.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        if follower is not None:
            follower.join(timeout=5)


def follow_metrics(
    out: RunDir, on_metrics: Callable[[dict[str, Any]], None], stop: Any, step_key: str
) -> None:
    """Hand every new line of ``out/metrics.jsonl`` to ``on_metrics`` until ``stop`` is set (a driver thread)."""
    seen = 0
    while not stop.is_set():
        try:
            lines = read_metrics(out, step_key=step_key)
        except (OSError, ValueError):
            lines = []
        for line in lines[seen:]:
            on_metrics(line)
        seen = max(seen, len(lines))
        stop.wait(0.5)
