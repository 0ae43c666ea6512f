"""The sample audit: which ids every step of every worker saw, per attempt, and their count per epoch.

Each worker writes ``OUT/samples/rank-R.jsonl``: a ``start`` line (the attempt and the position it resumed
from) and one line per step with its global step and ids. ``sample_audit`` counts them, leaving out steps that a later attempt
rolled back: a run is exactly-once when every committed id appears once per epoch.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from radio_dist.train.epochs import Position
from radio_dist.train.rundir import RunDir, RunLog


def samples_log_name(rank: int | str) -> str:
    """A worker's audit log in the run directory (``rank="*"``: the glob of all of them)."""
    return f"samples/rank-{rank}.jsonl"


class SampleLog:
    """One worker's audit log: a start line now (synced at once), then a line per step."""

    def __init__(self, log: RunLog, pos: Position, attempt: str, attempt_time: float) -> None:
        self.log = log
        log.write(
            {
                "start": [pos.epoch, pos.next_step],
                "segment": pos.segment,
                "global_step": pos.global_step,
                "attempt": attempt,
                "attempt_time": attempt_time,
                "pid": os.getpid(),
                "time": time.time(),
            }
        )
        log.sync()

    def step(self, epoch: int, step: int, global_step: int, ids: list[str]) -> None:
        self.log.write({"epoch": epoch, "step": step, "global_step": global_step, "ids": ids})


def sample_audit(out: str, storage_options: dict[str, Any] | None = None) -> dict[int, dict[str, int]]:
    """Which ids the surviving training history saw, per epoch: {epoch: {id: times}}.

    Every attempt of the job (all its workers share one attempt id and its rank 0's start time) logs a
    ``start`` line per worker with the global step it resumed from, then one line per step. A step an attempt
    ran at global step ``g`` was rolled back when a later attempt resumed from a step ``<= g`` — the number of
    workers may differ between attempts — so it is not counted. A clean run has every committed id exactly
    once per epoch.
    """
    run = RunDir(out, storage_options)
    files = sorted(run.fs.glob(run.path(samples_log_name("*"))))
    attempts: dict[str, tuple[float, int]] = {}  # attempt id -> (start time, global step resumed from)
    steps: list[tuple[str, dict[str, Any]]] = []
    for path in files:
        attempt = None
        with run.fs.open(path, "r") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                if "start" in rec:
                    attempt = str(rec["attempt"])
                    attempts[attempt] = (float(rec["attempt_time"]), int(rec["global_step"]))
                elif attempt is not None:
                    steps.append((attempt, rec))
    counts: dict[int, dict[str, int]] = {}
    for attempt, rec in steps:
        began = attempts[attempt][0]
        if any(t > began and g <= rec["global_step"] for t, g in attempts.values()):
            continue  # rolled back: a later attempt resumed from before this step
        c = counts.setdefault(rec["epoch"], {})
        for sid in rec["ids"]:
            c[sid] = c.get(sid, 0) + 1
    return counts
