"""`radio-dist bench train`: the real trainer (Ray Train, DDP over the job's workers) measured in one run.

On a store the caching pipeline makes from the bundled photos with the given teachers, it runs these
distillation jobs, one epoch each, and reads their ``metrics.jsonl`` (the first ``warmup`` steps of each
left out: allocations and first-call overheads):

- ``together``: every student on every batch (cached targets);
- ``separate``: each student alone, same data and settings;
- ``online``: every student, with every teacher run live in the workers instead of read from the store.

Reported (per step, on rank 0):

- ``multi_student_ratio``: together step time / sum of the separate ones (target <= 1.05): what training S
  students on one read per step costs over training them apart.
- ``data_wait_share``: share of the together job's step time spent waiting for the reader (target <= 5 %).
- ``cached_vs_online``: the cost of ``epochs`` epochs of the students with the targets cached — the teachers
  once (their forward time per step, measured in the online job) plus ``epochs`` cached epochs — against
  ``epochs`` online epochs; ``cached_vs_online_theory`` is E·(T + ΣS) / (T + E·ΣS) from the measured
  teacher time T and student compute ΣS per step, and ``cached_vs_online_of_theory`` their ratio (target
  >= 0.9: the store gives what the arithmetic promises). The caching job's decode and write overheads are
  `bench cache`'s subject; its wall time here (Ray Data start-up included) is ``cache_job_s``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from radio_dist.cache.config import DEFAULT_TEACHERS, CacheJobConfig
from radio_dist.cache.pipeline import run_cache
from radio_dist.teacher import preset_spec
from radio_dist.train.config import DistillConfig, default_students
from radio_dist.train.distill import run_distill
from radio_dist.train.rundir import read_metrics
from radio_dist.train.students import StudentSpec


def _steps(out: Path, warmup: int) -> list[dict[str, Any]]:
    lines = read_metrics(str(out))
    if len(lines) <= warmup:
        raise ValueError(
            f"{out}: {len(lines)} steps, not more than the {warmup} warm-up steps: use more --images or a "
            "smaller --batch-size"
        )
    return lines[warmup:]


def _mean(lines: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(float(m[key]) for m in lines)


def bench_train(
    images: int = 192,
    px: int = 128,
    batch_size: int = 8,
    workers: int = 2,
    epochs: int = 10,
    students: Sequence[StudentSpec] | None = None,
    teachers: Sequence[str] | None = None,
    warmup: int = 2,
    repeats: int = 1,
    workdir: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns its figures."""
    specs = list(students or default_students())
    names = [s.name for s in specs]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        store_url = str(root / "store")
        teacher_specs = [preset_spec(t) for t in (teachers or DEFAULT_TEACHERS)]
        log(f"caching {images} photo views at {px} px with {[t.name for t in teacher_specs]} ...")
        t0 = time.perf_counter()
        cached = run_cache(
            CacheJobConfig.model_validate(
                {
                    "source": {"kind": "sample-photos", "views": images},
                    "teachers": [t.model_dump(mode="json") for t in teacher_specs],
                    "store": {"url": store_url, "shard_size": 64},
                    "pipeline": {"partitions": {"low": px}},
                    "phis": {"fit_images": min(64, images)},
                }
            )
        )
        cache_s = time.perf_counter() - t0
        base: dict[str, Any] = {
            "store": {"url": store_url},
            "out": "",
            "students": [s.model_dump(mode="json") for s in specs],
            "train": {"epochs": 1, "batch_size": batch_size, "checkpoint_every": 0, "threads": 1},
            "scaling": {"num_workers": workers, "cpus_per_worker": 1, "max_failures": 0},
        }
        runs = 0

        def run(label: str, **over: Any) -> list[dict[str, Any]]:
            nonlocal runs
            runs += 1
            out = root / f"run-{runs}-{label}"
            log(f"{label}: {workers} Ray Train worker(s) ...")
            run_distill(DistillConfig.model_validate({**base, "out": str(out), **over}))
            return _steps(out, warmup)

        together_each, separate_each, wait_each, compute_each = [], [], [], []
        for _ in range(repeats):
            together = run("together")
            together_each.append(_mean(together, "step_s"))
            wait_each.append(sum(m["read_wait_s"] for m in together) / sum(m["step_s"] for m in together))
            compute_each.append(sum(_mean(together, f"{n}/step_s") for n in names))
            separate_each.append(
                {
                    s.name: _mean(run(f"alone-{s.name}", students=[s.model_dump(mode="json")]), "step_s")
                    for s in specs
                }
            )
        ratios = [t / sum(s.values()) for t, s in zip(together_each, separate_each, strict=True)]
        pick = sorted(range(repeats), key=lambda i: ratios[i])[repeats // 2]  # the median run
        online = run("online", teachers=[], live_teachers=[t.name for t in teacher_specs])
        online_step = _mean(online, "step_s")
        teacher_step = _mean(online, "live_teachers_s")
        together_step, compute = together_each[pick], compute_each[pick]
        e = epochs
        measured = e * online_step / (teacher_step + e * together_step)
        theory = e * (teacher_step + compute) / (teacher_step + e * compute)
        return {
            "images": images,
            "px": px,
            "batch_size_per_worker": batch_size,
            "workers": workers,
            "students": names,
            "teachers": [t.name for t in teacher_specs],
            "timed_steps_per_job": len(online),
            "cache_job_s": cache_s,
            "cache_ok": cached.ok,
            "together_step_s": together_step,
            "separate_step_s": separate_each[pick],
            "multi_student_ratio": ratios[pick],
            "multi_student_ratio_each": ratios,
            "student_compute_step_s": compute,
            "data_wait_share": wait_each[pick],
            "online_step_s": online_step,
            "teacher_step_s": teacher_step,
            "epochs": e,
            "cached_vs_online": measured,
            "cached_vs_online_theory": theory,
            "cached_vs_online_of_theory": measured / theory,
        }
