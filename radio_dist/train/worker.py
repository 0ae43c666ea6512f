"""The Ray Train worker scaffold that every radio-dist training job runs in (distillation, FeatSharp).

A job's ``train_loop_per_worker`` opens a ``TrainWorker`` and keeps only its own step::

    worker = TrainWorker.start(cfg.scaling, cfg.train.threads, RunDir(cfg.out, ...), cfg.debug)
    restored = worker.restore()                    # None on a fresh start, else .meta and .states
    while ...:
        ...one step...
        worker.log(line)                           # OUT/metrics.jsonl (and OUT/tensorboard), by rank 0
        worker.after_step(done)                    # fault injection: SIGKILL once at debug.kill_at_step
        worker.checkpoint(metrics, meta, states)   # every rank calls it: Ray Train's report is a barrier
        worker.after_checkpoint(done)              # fault injection: stop once after debug.stop_after_step
    worker.close()

A checkpoint is a directory of named state dicts (``NAME.pt``, written by rank 0), the job's metadata
(``state.json``) and, for FSDP2 students, sharded states (``NAME.dcp``, each worker its shards; see
``radio_dist.train.sharded``); it is restored with ``torch.load(weights_only=True)`` and DCP behind a
restricted unpickler: a checkpoint on shared storage never runs code. The logs a job opens through ``open_log`` are synced at every checkpoint, so an object store holds
exactly what the last checkpoint covers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, NonNegativeInt

from radio_dist.config import StrictModel
from radio_dist.train.rundir import RunDir, RunLog
from radio_dist.train.sharded import save_sharded

STATE_FILE = "state.json"
SHARDS_SUFFIX = ".dcp"  # a sharded state's directory in a checkpoint
TENSORBOARD_DIR = "tensorboard"
STEP_KEYS = {"global_step", "step", "total_steps"}


class ScalingSettings(StrictModel):
    """How many Ray Train workers and what each gets; only values change between laptop and cluster."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    max_failures: int = Field(2, ge=-1, description="Worker failures recovered from the last checkpoint.")

    def demand(self) -> dict[str, float]:
        """Ray resources the job's workers hold for the whole run: ``{"CPU": .., "GPU": ..}``."""
        return {
            "CPU": self.num_workers * self.cpus_per_worker,
            "GPU": float(self.num_workers) if self.use_gpu else 0.0,
        }


class DebugSettings(StrictModel):
    """Fault injection for the tests that prove nothing is lost or duplicated."""

    kill_at_step: NonNegativeInt | list[NonNegativeInt] | None = Field(
        None, description="SIGKILL one worker after this global step (or each of these), once each."
    )
    kill_rank: int = Field(0, ge=0, description="Which worker kill_at_step kills.")
    stop_after_step: int | None = Field(
        None,
        ge=0,
        description="Raise after this global step (simulates a job that stops and is re-launched).",
    )


@dataclass(frozen=True)
class WorkerContext:
    """Where this worker runs: its rank among ``world`` workers and its torch device."""

    rank: int
    world: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """True when the workers share a torch process group (more than one worker)."""
        import torch.distributed as dist

        return self.world > 1 and dist.is_available() and dist.is_initialized()


def worker_context(scaling: ScalingSettings, threads: int | None = None) -> WorkerContext:
    """This Ray Train worker's context; sets torch's threads (``threads``, default: the worker's CPUs)."""
    import ray.train

    ctx = ray.train.get_context()
    device = torch.device("cpu")
    if scaling.use_gpu and torch.cuda.is_available():
        from ray.train.torch import get_device

        device = get_device()  # this worker's own GPU
        torch.cuda.set_device(device)
    torch.set_num_threads(threads or max(1, int(scaling.cpus_per_worker)))
    return WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), device)


@dataclass
class Restored:
    """What ``TrainWorker.restore`` found: the job's metadata and its named state dicts (on the device)."""

    meta: dict[str, Any]
    states: dict[str, Any]
    shards: dict[str, Path] = field(default_factory=dict)  # name -> its DCP directory (sharded students)
    opened: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def close(self) -> None:
        """Release the checkpoint's local copy (after the sharded states were loaded)."""
        self.opened.close()


class TrainWorker:
    """One Ray Train worker of a job: context, run directory, metrics log, checkpoints, fault injection."""

    def __init__(self, ctx: WorkerContext, out: RunDir, debug: DebugSettings) -> None:
        self.ctx, self.out, self.debug = ctx, out, debug
        self.logs: list[RunLog] = []
        self.metrics = self.open_log("metrics.jsonl") if ctx.rank == 0 else None
        self.tb: Any = None  # rank 0's TensorBoard writer (open_tensorboard)
        self._tb_local: str | None = None  # where it writes when the run directory is remote
        self.attempt = self._attempt()

    def _attempt(self) -> tuple[str, float]:
        """(id, start time) of this attempt of the job, rank 0's on every worker (the sample audit's key)."""
        mine: list[Any] = [uuid.uuid4().hex[:12], time.time()]
        if self.ctx.distributed:
            import torch.distributed as dist

            dist.broadcast_object_list(mine, src=0)
        return str(mine[0]), float(mine[1])

    @classmethod
    def start(
        cls, scaling: ScalingSettings, threads: int | None, out: RunDir, debug: DebugSettings
    ) -> TrainWorker:
        return cls(worker_context(scaling, threads), out, debug)

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def open_log(self, rel: str) -> RunLog:
        """A JSON-lines log in the run directory, synced at every checkpoint and closed by ``close``."""
        log = RunLog(self.out, rel)
        self.logs.append(log)
        return log

    def open_tensorboard(self, purge_step: int) -> None:
        """Rank 0 also writes every logged number as a TensorBoard scalar under ``OUT/tensorboard``
        (``tensorboard --logdir OUT``). Events an earlier attempt wrote from ``purge_step`` on — steps rolled
        back with its checkpoint — are hidden by the new ones. On an object store the event files are
        written locally and uploaded at every checkpoint, like the logs."""
        if self.rank != 0 or self.tb is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self.out.is_local:
            logdir = self.out.path(TENSORBOARD_DIR)
        else:
            self._tb_local = logdir = tempfile.mkdtemp(prefix="radio-dist-tb-")
        self.tb = SummaryWriter(logdir, purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics line (rank 0 writes; the others' calls do nothing), also to TensorBoard if open; the
        line's ``global_step`` (or ``step``) is the scalars' step."""
        if self.metrics is not None:
            self.metrics.write(record)
        if self.tb is not None:
            step = int(record.get("global_step", record.get("step", 0)))
            for k, v in record.items():
                if k not in STEP_KEYS and isinstance(v, int | float) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def _sync_tensorboard(self) -> None:
        if self.tb is None:
            return
        self.tb.flush()
        if self._tb_local is not None:
            self.out.upload_dir(self._tb_local, TENSORBOARD_DIR)

    def restore(self) -> Restored | None:
        """The checkpoint Ray Train resumes this attempt from, or None on a fresh start. Its sharded states
        (``NAME.dcp``) stay readable until ``Restored.close``."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        opened = contextlib.ExitStack()
        d = Path(opened.enter_context(ckpt.as_directory()))
        try:
            if not (d / STATE_FILE).is_file():
                raise RuntimeError(
                    f"checkpoint {ckpt.path} has no {STATE_FILE}: it was written by an older radio-dist — resume "
                    "it with that version, or start a new run directory (--out)"
                )
            meta = json.loads((d / STATE_FILE).read_text())
            states = {
                p.stem: torch.load(p, map_location=self.device, weights_only=True)
                for p in sorted(d.glob("*.pt"))
            }
            shards = {
                p.name[: -len(SHARDS_SUFFIX)]: p for p in sorted(d.glob(f"*{SHARDS_SUFFIX}")) if p.is_dir()
            }
        except BaseException:
            opened.close()
            raise
        if not shards:
            opened.close()
        return Restored(meta, states, shards, opened)

    def checkpoint(
        self,
        metrics: dict[str, Any],
        meta: dict[str, Any],
        states: dict[str, Any],
        shards: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Report ``metrics`` with a checkpoint of ``states`` (name -> state dict) and ``meta`` (JSON), written
        by rank 0, and of ``shards`` (name -> this worker's DCP shards), written by every worker under
        ``NAME.dcp`` and merged by Ray Train. Every rank must call it at the same steps (Ray Train's report is
        a barrier)."""
        import ray.train

        for log in self.logs:
            log.sync()
        self._sync_tensorboard()
        if self.rank != 0 and not shards:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            for name, tensors in (shards or {}).items():
                save_sharded(tensors, Path(d) / f"{name}{SHARDS_SUFFIX}")
            if self.rank == 0:
                for name, state in states.items():
                    torch.save(state, Path(d) / f"{name}.pt")
                (Path(d) / STATE_FILE).write_text(json.dumps(meta))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def after_step(self, done: int) -> None:
        """Fault injection: ``debug.kill_at_step`` SIGKILLs worker ``kill_rank`` once, after that step
        (``done`` steps done), leaving a marker so the restarted attempt runs through."""
        k = self.debug.kill_at_step
        steps = [] if k is None else [k] if isinstance(k, int) else k
        if done - 1 in steps and self.rank == self.debug.kill_rank:
            marker = f"killed-{done - 1}"
            if not self.out.exists(marker):
                self.out.touch(marker)
                os.kill(os.getpid(), signal.SIGKILL)

    def after_checkpoint(self, done: int) -> None:
        """Fault injection: ``debug.stop_after_step`` raises on every worker once, after that step (a job that
        stops and is launched again)."""
        k = self.debug.stop_after_step
        if k is not None and done == k + 1:
            marker = f"stopped-{k}-rank{self.rank}"
            if not self.out.exists(marker):
                self.out.touch(marker)
                raise RuntimeError(f"debug.stop_after_step: stopping after step {k}")

    def close(self) -> None:
        for log in self.logs:
            log.close()
        self.logs = []
        if self.tb is not None:
            self.tb.close()
            self.tb = None
            if self._tb_local is not None:
                self.out.upload_dir(self._tb_local, TENSORBOARD_DIR)
                shutil.rmtree(self._tb_local, ignore_errors=True)
