"""Multi-student distillation from a feature store with Ray Train.

Every Ray Train worker streams its share of the store's shards (``radio_dist.train.reader``) and, each step,
every student trains on the same batch: the targets are read once per step however many students there are.
The method's ingredients are pure functions in ``radio_dist.train.losses``, wired per student in
``radio_dist.train.step``; the worker scaffold (checkpoints, metrics, fault injection) is
``radio_dist.train.worker``. This module is the job: ``Distiller`` (one worker's loop, in named steps),
``train_loop_per_worker`` and ``run_distill``.

Resumption: a checkpoint holds every student, optimizer and EMA, plus the data position (epoch, next step) in
the deterministic per-epoch plan. A restarted worker (``FailureConfig``) or a re-launched job (same ``out``)
continues from there, so each sample of an epoch is trained on exactly once; ``OUT/samples/rank-*.jsonl``
is an audit log of which ids each step saw, per attempt (``radio_dist.train.audit``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from radio_dist.phis import PhiS
from radio_dist.ray_setup import init_ray
from radio_dist.store import FeatureStore, StoreMismatchError
from radio_dist.train import losses as L
from radio_dist.train.audit import SampleLog, samples_log_name
from radio_dist.train.config import DistillConfig
from radio_dist.train.driver import absolute_path, fit_with_ray_train
from radio_dist.train.gradsync import broadcast_params, mean_over_workers
from radio_dist.train.plan import RunPlan, prepare_run, step_choice
from radio_dist.train.reader import Batch, ShardStream, WorkerPlan, epoch_plan
from radio_dist.train.rundir import RunDir, read_metrics
from radio_dist.train.step import StudentState, lr_at, student_step, to_images
from radio_dist.train.students import StudentModel, export_student
from radio_dist.train.worker import TrainWorker


def metric_keys(cfg: DistillConfig, plan: RunPlan) -> list[str]:
    """Every loss a step reports, ``student/teacher/part``, in a fixed order (workers average them)."""
    keys = []
    for s in cfg.students:
        parts = [f"{t}/spatial" for t in plan.teachers]
        if cfg.train.summary_weight > 0:
            parts += [f"{t}/summary" for t in plan.teachers if plan.has_summary(t)]
        if cfg.train.mesa_weight > 0:
            parts.append("mesa")
        keys += [f"{s.name}/{part}" for part in [*parts, "total"]]
    return keys


@dataclass
class StepResult:
    """What one step of every student on one batch reports."""

    metrics: dict[str, float]  # metric_keys, averaged over the workers (sample-weighted)
    images: int  # samples of the step over all workers
    lr: float
    damp_sigma: float


class Distiller:
    """One Ray Train worker of a distillation job: every student, the data position, the checkpoints."""

    def __init__(self, cfg: DistillConfig, plan: RunPlan) -> None:
        self.cfg, self.plan = cfg, plan
        self.worker = TrainWorker.start(
            cfg.scaling, cfg.train.threads, RunDir(cfg.out, cfg.out_storage_options), cfg.debug
        )
        self.store = FeatureStore.from_config(cfg.store)
        self.shards = plan.shard_rows(self.store)
        device = self.worker.device
        self.students = {s.name: StudentState(s, plan.heads, cfg.train, device) for s in cfg.students}
        self.epoch, self.next_step, self.global_step = self.restore()
        self.keys = metric_keys(cfg, plan)
        steps_per_epoch = self.epoch_plan(0).steps
        self.total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
        log = self.worker.open_log(samples_log_name(self.worker.rank))
        self.samples = SampleLog(log, self.epoch, self.next_step)

    def epoch_plan(self, epoch: int) -> WorkerPlan:
        """This worker's share of ``epoch`` (the plan every worker derives alike)."""
        t, r = self.cfg.train, self.cfg.reader
        return epoch_plan(self.shards, epoch, t.seed, self.worker.ctx.world, t.batch_size, r.shuffle_shards)[
            self.worker.rank
        ]

    def restore(self) -> tuple[int, int, int]:
        """(epoch, next step, global step) from the last checkpoint, students and optimizers loaded; a fresh
        start instead takes rank 0's initial weights on every worker."""
        restored = self.worker.restore()
        if restored is None:
            if self.worker.ctx.distributed:
                for st in self.students.values():
                    broadcast_params(st.model)
                    if st.ema is not None:
                        st.ema.load_state_dict(st.model.state_dict())
            return 0, 0, 0
        meta = restored.meta
        if meta["digest"] != self.plan.digest or meta["fingerprints"] != self.plan.fingerprints:
            raise StoreMismatchError(
                "the checkpoint was trained on other data or teachers than the store now holds "
                f"(digest {meta['digest']} vs {self.plan.digest}); use a new --out"
            )
        missing = sorted(set(self.students) - set(restored.states))
        if missing:
            raise StoreMismatchError(
                f"the checkpoint holds students {sorted(restored.states)}, not {missing}: a relaunch trains the "
                "students it started with; use a new --out for another set"
            )
        for name, st in self.students.items():
            st.load_state_dict(restored.states[name])
        return int(meta["epoch"]), int(meta["next_step"]), int(meta["global_step"])

    def run(self) -> None:
        """Train from the restored position to the last epoch (or ``train.max_steps``), then export."""
        while self.epoch < self.cfg.train.epochs:
            if self.train_epoch():
                break
            self.epoch, self.next_step = self.epoch + 1, 0
        self.worker.close()
        if self.worker.rank == 0:
            self.export()

    def train_epoch(self) -> bool:
        """The rest of the current epoch, from ``next_step``; True when ``train.max_steps`` was reached."""
        train = self.cfg.train
        plan = self.epoch_plan(self.epoch)
        stream = ShardStream(
            self.store,
            plan,
            self.plan.teachers,
            self.plan.partitions,
            lambda s, e=self.epoch: step_choice(self.plan, train, e, s)[0],
            self.cfg.reader,
            start_step=self.next_step,
        )
        for batch in stream:
            t0 = time.perf_counter()
            _, resolution = step_choice(self.plan, train, self.epoch, batch.step)
            result = self.train_step(batch, resolution)
            self.samples.step(self.epoch, batch.step, batch.ids)
            self.global_step += 1
            last_of_epoch = batch.step == plan.steps - 1
            done = train.max_steps is not None and self.global_step >= train.max_steps
            if self.global_step % train.log_every == 0 or last_of_epoch:
                self.log_step(batch, resolution, result, time.perf_counter() - t0)
            self.worker.after_step(self.global_step)
            metrics = {"epoch": self.epoch, "global_step": self.global_step, **result.metrics}
            if last_of_epoch:
                self.checkpoint(self.epoch + 1, 0, metrics)
            elif done or (train.checkpoint_every and self.global_step % train.checkpoint_every == 0):
                self.checkpoint(self.epoch, batch.step + 1, metrics)
            self.worker.after_checkpoint(self.global_step)
            if done:
                return True
        return False

    def train_step(self, batch: Batch, resolution: int) -> StepResult:
        """Every student one optimizer step on this worker's share of the step's batch."""
        ctx, train = self.worker.ctx, self.cfg.train
        n_local = n_global = len(batch)
        if ctx.distributed:
            import torch.distributed as dist

            nt = torch.tensor([n_local], dtype=torch.float64)
            dist.all_reduce(nt)
            n_global = int(nt.item())
        lr = lr_at(self.global_step, self.total_steps, train)
        sigma = L.damp_sigma(self.global_step, self.total_steps, train.damp_sigma, train.damp_schedule)
        images = to_images(batch, resolution, ctx.device) if n_local else None
        metrics: dict[str, float] = {}
        for i, (name, st) in enumerate(self.students.items()):
            rng = np.random.default_rng([train.seed & 0xFFFFFFFF, self.epoch, batch.step, ctx.rank, i, 0x5F])
            parts = student_step(
                st,
                images,
                batch,
                self.plan,
                train,
                rng,
                lr,
                sigma,
                ctx.device,
                grad_scale=n_local / max(1, n_global),
                distributed=ctx.distributed,
                update=n_global > 0,
            )
            metrics.update({f"{name}/{k}": v for k, v in parts.items()})
        if ctx.distributed:
            metrics = mean_over_workers(metrics, self.keys, n_local)
        return StepResult(metrics, n_global, lr, sigma)

    def log_step(self, batch: Batch, resolution: int, result: StepResult, step_s: float) -> None:
        self.worker.log(
            {
                "epoch": self.epoch,
                "step": batch.step,
                "global_step": self.global_step,
                "total_steps": self.total_steps,
                "partition": batch.partition,
                "resolution": resolution,
                "images": result.images,
                "step_s": step_s,
                "read_wait_s": batch.read_wait_s,
                "lr": result.lr,
                "damp_sigma": result.damp_sigma,
                **result.metrics,
            }
        )

    def checkpoint(self, epoch: int, next_step: int, metrics: dict[str, Any]) -> None:
        """Every student, optimizer and EMA, and the data position the next attempt resumes from."""
        meta = {
            "epoch": epoch,
            "next_step": next_step,
            "global_step": self.global_step,
            "digest": self.plan.digest,
            "fingerprints": self.plan.fingerprints,
        }
        states = {name: st.state_dict() for name, st in self.students.items()}
        self.worker.checkpoint(metrics, meta, states)

    def export(self) -> None:
        """Every student (or its EMA, ``train.export_ema``) under OUT/students/<name> with the store's PHI-S."""
        phis = {t: self.store.phis(t) for t in self.plan.teachers}
        for name, st in self.students.items():
            model = st.ema if (self.cfg.train.export_ema and st.ema is not None) else st.model
            export_to(self.worker.out, name, model, phis, self.plan)


def export_to(out: RunDir, name: str, model: StudentModel, phis: dict[str, PhiS], plan: RunPlan) -> None:
    """Export one student under OUT/students/<name> (written locally, then copied for remote outs)."""
    extra = {"fingerprints": plan.fingerprints, "phis_sha256": plan.phis_sha256, "digest": plan.digest}
    model = model.to("cpu")
    if out.is_local:
        export_student(model, out.path(f"students/{name}"), phis=phis, extra=extra)
        return
    with tempfile.TemporaryDirectory() as d:
        export_student(model, d, phis=phis, extra=extra)
        out.upload_dir(d, f"students/{name}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: every worker trains every student on its share of each step."""
    Distiller(DistillConfig.model_validate(config["cfg"]), RunPlan.model_validate(config["run"])).run()


def run_distill(
    cfg: DistillConfig, on_metrics: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Check the store, start Ray Train, follow its metrics; returns a summary of the run."""
    cfg = cfg.model_copy(
        update={
            "store": cfg.store.model_copy(update={"url": absolute_path(cfg.store.url)}),
            "out": absolute_path(cfg.out),
        }
    )
    plan = prepare_run(cfg)
    init_ray(cfg.ray)
    out = RunDir(cfg.out, cfg.out_storage_options)
    out.fs.makedirs(out.root, exist_ok=True)
    with out.open("run.json", "w") as f:
        f.write(
            json.dumps({"config": cfg.model_dump(mode="json"), "run": plan.model_dump(mode="json")}, indent=1)
        )
    t0 = time.perf_counter()
    result = fit_with_ray_train(
        train_loop_per_worker,
        {"cfg": cfg.model_dump(mode="json"), "run": plan.model_dump(mode="json")},
        out,
        cfg.name,
        cfg.scaling,
        on_metrics,
    )
    lines = read_metrics(out)
    last = lines[-1] if lines else {}
    return {
        "out": cfg.out,
        "students": [s.name for s in cfg.students],
        "teachers": list(plan.teachers),
        "rows": plan.rows,
        "global_step": last.get("global_step", 0),
        "wall_s": time.perf_counter() - t0,
        "checkpoint": str(result.checkpoint.path) if result.checkpoint else None,
        "last": last,
    }
