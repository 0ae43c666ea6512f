"""The sample audit: which ids every step of every worker saw, per attempt, and their count per epoch.

Each worker writes ``OUT/samples/rank-R.jsonl``: a ``start`` line (the position the attempt resumed from)
and one line per step with its ids. ``sample_audit`` counts them, leaving out steps that a later attempt
rolled back: a run is exactly-once when every committed id appears once per epoch.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from radio_dist.train.rundir import RunDir, RunLog


def samples_log_name(rank: int | str) -> str:
    """A worker's audit log in the run directory (``rank="*"``: the glob of all of them)."""
    return f"samples/rank-{rank}.jsonl"


class SampleLog:
    """One worker's audit log: a start line now (synced at once), then a line per step."""

    def __init__(self, log: RunLog, epoch: int, next_step: int) -> None:
        self.log = log
        log.write({"start": [epoch, next_step], "pid": os.getpid(), "time": time.time()})
        log.sync()

    def step(self, epoch: int, step: int, ids: list[str]) -> None:
        self.log.write({"epoch": epoch, "step": step, "ids": ids})


def sample_audit(out: str, storage_options: dict[str, Any] | None = None) -> dict[int, dict[str, int]]:
    """Which ids the surviving training history saw, per epoch: {epoch: {id: times}}.

    Each worker logs a ``start`` line (the position it resumed from) and one line per step. Steps an attempt
    ran after the position the next attempt resumed from were rolled back with the checkpoint, so they are
    not counted. A clean run has every committed id exactly once per epoch.
    """
    run = RunDir(out, storage_options)
    files = sorted(run.fs.glob(run.path(samples_log_name("*"))))
    attempts: list[list[tuple[tuple[int, int], list[dict[str, Any]]]]] = []
    for path in files:
        per_rank: list[tuple[tuple[int, int], list[dict[str, Any]]]] = []
        with run.fs.open(path, "r") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                if "start" in rec:
                    per_rank.append((tuple(rec["start"]), []))  # type: ignore[arg-type]
                elif per_rank:
                    per_rank[-1][1].append(rec)
        attempts.append(per_rank)
    counts: dict[int, dict[str, int]] = {}
    for per_rank in attempts:
        for i, (_, recs) in enumerate(per_rank):
            limit = per_rank[i + 1][0] if i + 1 < len(per_rank) else (1 << 62, 0)
            for rec in recs:
                if (rec["epoch"], rec["step"]) < limit:
                    c = counts.setdefault(rec["epoch"], {})
                    for sid in rec["ids"]:
                        c[sid] = c.get(sid, 0) + 1
    return counts
