"""Starting and configuring Ray, the same way for every job (caching, distillation, FeatSharp training).

``init_ray(cfg)`` joins a cluster (``ray.address``, or ``RAY_ADDRESS`` inside a Ray job) or starts a local
instance with the settings below; ``ALLOCATOR_ENV`` is the environment every worker process of a local
instance, every teacher actor and every submitted job gets. Only ``ray`` itself is imported lazily, so the
config models here can be read without it (the GPU check machine has no Ray).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from pydantic import Field

from radio_dist.config import CONNECT_TIMEOUT_ENV, StrictModel, connect_timeout_s, debugging, wait_for_port

# glibc malloc returns big freed blocks to the OS after every batch, so the next batch page-faults them
# back in: measured on a 2-core CPU, sys time was ~half of an EfficientNet-Lite0 forward (6.5 s -> 2.8 s
# for 5 batches of 32 with these set). Keeping freed memory in the process costs only address space.
# Ray Data calls an actor's UDF in a worker thread, and a non-main thread allocates from its own glibc
# arena, whose heaps are capped at 64 MiB: a bigger activation is mmap'd and munmap'd on every forward
# whatever the thresholds say (EfficientNet-Lite0, batch 32, 1 thread, called in a thread: 28 ms/image; a
# pipeline actor took 55-83k page faults/s). One arena: every thread allocates from the main heap (21 ms/image).
# Ray Train runs the training loop in a thread too: a FeatSharp step on MobileNetV2 took 3.8 s without these,
# 2.3 s with them (2-core CPU, sample config, step 10).
ALLOCATOR_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "67108864",
}


class RayConfig(StrictModel):
    """How a job reaches Ray."""

    address: str | None = Field(
        None, description="Ray address; None starts (or joins via RAY_ADDRESS) a local one."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local instance (default: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local instance (default: detected).")
    progress_bars: bool = Field(False, description="Show Ray Data's own operator progress bars too.")
    log_to_driver: bool = Field(
        False,
        description="Forward worker/actor logs to this process. Off: a failure is told in one line and the "
        "workers' logs stay in Ray's session directory (/tmp/ray/session_latest/logs); --debug turns it on.",
    )

    @property
    def on_cluster(self) -> bool:
        """True when the job joins an existing cluster (which may autoscale) rather than a local instance."""
        return bool(self.address or os.environ.get("RAY_ADDRESS"))


def local_ray_options(cfg: RayConfig) -> dict[str, Any]:
    """``ray.init`` options of a local instance this process starts (see ``init_ray``)."""
    return {
        "num_cpus": cfg.num_cpus,
        "num_gpus": cfg.num_gpus,
        "include_dashboard": False,
        # Task workers (decode/write) must not be killed as soon as they idle: with actors holding most of a
        # small machine's CPUs, Ray's default soft limit (= num_cpus workers) recycles them after 1 s and every
        # new worker re-imports torch & co. — that churn cost more CPU than the teachers on 2 cores.
        "_system_config": {"num_workers_soft_limit": 32, "idle_worker_killing_time_threshold_ms": 600_000},
        "runtime_env": {"env_vars": dict(ALLOCATOR_ENV)},
    }


class RayUnreachableError(RuntimeError):
    """The Ray cluster a job is to join does not accept connections (``ray.init`` would wait for it without
    end, printing a warning every few seconds)."""


def check_reachable(address: str, origin: str, bound_s: float) -> None:
    """A TCP connection to the cluster's ``host:port`` (or ``ray://host:port``) within ``bound_s`` seconds, else
    a ``RayUnreachableError`` naming the address and where it came from (``origin``). Other forms (``auto``,
    ``local``, a bare host, another scheme) are Ray's to resolve."""
    if "://" in address and not address.startswith("ray://"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    e = wait_for_port(host.strip("[]"), int(port), bound_s)
    if e is not None:
        raise RayUnreachableError(
            f"cannot reach the Ray cluster at {address} ({origin}; {e.strerror or e}; tried for {bound_s:.0f} s): "
            "check that its head is up (`ray status` there) and the address (the GCS port, 6379 by default, "
            f"or ray://HOST:10001); leave it unset for a local instance; {CONNECT_TIMEOUT_ENV} sets how long to wait"
        )


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster ``cfg`` names (or ``RAY_ADDRESS``), or start a local instance; no-op if Ray is up."""
    import ray

    if ray.is_initialized():
        return
    forward = cfg.log_to_driver or debugging()
    level = "warning" if debugging() else "error"  # Ray's notices (token auth on, ...) only with --debug
    kwargs: dict[str, Any] = {"logging_level": level, "log_to_driver": forward}
    if cfg.on_cluster:
        if cfg.address:
            kwargs["address"] = cfg.address
        origin = "ray.address" if cfg.address else "RAY_ADDRESS"
        check_reachable(cfg.address or os.environ.get("RAY_ADDRESS", ""), origin, connect_timeout_s())
    else:
        kwargs.update(local_ray_options(cfg))
    ray.init(**kwargs)


def configure_data(cfg: RayConfig) -> None:
    """Ray Data's console output for a radio-dist job: radio-dist shows its own progress."""
    import ray.data

    if not cfg.progress_bars and not debugging():
        # keep Ray Data's own lines out: radio-dist shows progress and tells a failure in one line; its advice
        # on tuning (a concurrency cap above an operator's inputs, ...) is not the user's to act on either
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\.")
    elif not cfg.progress_bars:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
