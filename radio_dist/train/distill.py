"""Multi-student distillation from a feature store with Ray Train.

Every Ray Train worker streams its share of the store's shards (``radio_dist.train.reader``) and, each step,
every student trains on the same batch: the targets are read once per step however many students there are.
The method's ingredients are pure functions in ``radio_dist.train.losses``, wired per student in
``radio_dist.train.step``; the worker scaffold (checkpoints, metrics, fault injection) is
``radio_dist.train.worker``. This module is the job: ``Distiller`` (one worker's loop, in named steps),
``train_loop_per_worker`` and ``run_distill``.

Each student trains through PyTorch's DDP (``radio_dist.train.parallel``), under bf16 autocast on CUDA, with
its gradient norm clipped and logged and non-finite steps skipped (``radio_dist.train.step``).

Resumption: a checkpoint holds every student, optimizer and EMA, plus the data position
(``radio_dist.train.epochs``: epoch, plan inputs, steps done). A restarted worker (``FailureConfig``) or a
re-launched job (same ``out``) continues from there — with other workers, batch size or shuffle window the
rest of the epoch is re-planned — so each sample of an epoch is trained on exactly once;
``OUT/samples/rank-*.jsonl`` is an audit log of which ids each step saw, per attempt
(``radio_dist.train.audit``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from radio_dist.phis import PhiS
from radio_dist.ray_setup import init_ray
from radio_dist.store import FeatureStore
from radio_dist.teacher import create_teacher
from radio_dist.train import losses as L
from radio_dist.train.audit import SampleLog, samples_log_name
from radio_dist.train.config import DistillConfig
from radio_dist.train.driver import absolute_path, fit_with_ray_train
from radio_dist.train.epochs import Position, plans_for
from radio_dist.train.live import LiveTeacher, fit_images, fit_live, load_live, save_live
from radio_dist.train.parallel import autocast_dtype, mean_over_workers, peak_tflops, sum_over_workers
from radio_dist.train.plan import RunPlan, prepare_run, step_choice
from radio_dist.train.reader import ShardStream, view_choice
from radio_dist.train.resume import (
    ResumeError,
    check_relaunch,
    checkpoint_meta,
    checkpoint_position,
    plan_inputs,
    relaunch_problem,
)
from radio_dist.train.rundir import RunDir, read_metrics
from radio_dist.train.step import StudentState, lr_at, student_step, to_images
from radio_dist.train.students import StudentModel, build_student, export_student
from radio_dist.train.transfer import DeviceBatch, device_batches, host_alloc
from radio_dist.train.worker import TrainWorker
from radio_dist.weights import check_weights_file


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
    extra: dict[str, float]  # per student: grad_norm, step_s, skipped (identical on every worker but timing)
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
        self.views = view_choice(self.store, self.shards) if plan.views == "one" else None
        ctx = self.worker.ctx
        self.live = self.start_live()  # adds the live teachers' heads to self.plan
        self.dtype = autocast_dtype(cfg.train.precision, ctx.device)
        self.students = {
            s.name: StudentState(s, self.plan.heads, cfg.train, ctx.device, ctx.distributed, self.dtype)
            for s in cfg.students
        }
        self.inputs = plan_inputs(cfg, ctx.world)
        self.pos = self.restore()
        self.keys = metric_keys(cfg, self.plan)
        # (student, resolution) -> FLOPs per sample of a step, counted once (MFU)
        self.flops: dict[tuple[str, int], float] = {}
        self.peak = peak_tflops(ctx.device)
        self.total_steps = cfg.train.max_steps or self.planned_steps()
        log = self.worker.open_log(samples_log_name(self.worker.rank))
        self.samples = SampleLog(log, self.pos, *self.worker.attempt)
        self.worker.open_tensorboard(purge_step=self.pos.global_step + 1)  # logged steps count steps done

    @property
    def global_step(self) -> int:
        return self.pos.global_step

    def start_live(self) -> dict[str, LiveTeacher]:
        """The live teachers on this worker's device. Rank 0 fits each one's PHI-S on first use and saves it
        in the run directory (a later attempt finds it there); every worker then loads it from there."""
        plan, ctx, out = self.plan, self.worker.ctx, self.worker.out
        if not plan.live:
            return {}
        meta = self.store.meta()
        sizes = {p: int(meta.partitions[p]) for p in plan.partitions}
        models = {name: create_teacher(spec, ctx.device) for name, spec in plan.live.items()}
        if ctx.rank == 0:
            views = None
            for name, spec in plan.live.items():
                info = load_live(out, name)
                if info is None:
                    if views is None:
                        views = fit_images(self.store, self.shards, plan.partitions, self.cfg.live_fit_images)
                    info = fit_live(spec, models[name], views, sizes, plan.fingerprints[name])
                    save_live(out, name, info)
        if ctx.distributed:
            import torch.distributed as dist

            dist.barrier()
        live: dict[str, LiveTeacher] = {}
        for name, spec in plan.live.items():
            info = load_live(out, name)
            assert info is not None  # rank 0 saved it before the barrier
            if info.fingerprint != plan.fingerprints[name]:
                raise ResumeError(
                    f"live teacher {name!r} changed (fingerprint {plan.fingerprints[name]}) since its PHI-S was "
                    f"fitted in {out.url} (for {info.fingerprint}): set it back, or use a new --out"
                )
            live[name] = LiveTeacher(spec, models[name], info, sizes)
        self.plan = plan.model_copy(
            update={
                "heads": {**plan.heads, **{n: t.info.head for n, t in live.items()}},
                "dispersion": {**plan.dispersion, **{n: t.info.dispersion for n, t in live.items()}},
                "phis_sha256": {**plan.phis_sha256, **{n: t.info.phis_sha256 for n, t in live.items()}},
            }
        )
        return live

    def live_targets(self, batch: DeviceBatch) -> float:
        """Add the live teachers' targets of the step to ``batch``; the seconds it took."""
        if not self.live or not len(batch):
            return 0.0
        t0 = time.perf_counter()
        for name, teacher in self.live.items():
            summary, dense = teacher.targets(batch.images, batch.host.partition)
            # outside inference mode, so the losses may keep them for the backward pass
            batch.dense[name] = dense.clone()
            batch.summary[name] = summary.clone() if summary is not None else None
        if self.worker.device.type == "cuda":
            torch.cuda.synchronize(self.worker.device)
        return time.perf_counter() - t0

    def planned_steps(self) -> int:
        """Steps of the whole job: those done, the rest of this epoch's plan, whole epochs after it."""
        rest = plans_for(self.shards, self.pos, self.views)[0].steps - self.pos.next_step
        later = self.cfg.train.epochs - self.pos.epoch - 1
        whole = plans_for(self.shards, Position(epoch=self.pos.epoch, inputs=self.inputs), self.views)[
            0
        ].steps
        return self.pos.global_step + max(0, rest) + max(0, later) * whole

    def restore(self) -> Position:
        """The data position from the last checkpoint (students and optimizers loaded), continued under this
        job's plan inputs: the same plan if they are the checkpoint's, else the epoch's rest re-planned."""
        restored = self.worker.restore()
        if restored is None:
            return Position(inputs=self.inputs)
        meta = restored.meta
        problem = relaunch_problem(meta, self.plan, list(self.students))
        if problem:
            raise ResumeError(problem)
        try:
            for name, st in self.students.items():
                st.load_state_dict(restored.states[name], restored.shards.get(name))
        finally:
            restored.close()
        return checkpoint_position(meta, self.inputs).resumed_with(self.inputs)

    def run(self) -> None:
        """Train from the restored position to the last epoch (or ``train.max_steps``), then export."""
        while self.pos.epoch < self.cfg.train.epochs:
            if self.train_epoch():
                break
            self.pos = self.pos.next_epoch(self.inputs, self.global_step)
        self.worker.close()
        self.export()  # every worker: sharded students gather their weights; rank 0 writes

    def train_epoch(self) -> bool:
        """The rest of the current epoch's segment; True when ``train.max_steps`` was reached."""
        train, pos = self.cfg.train, self.pos
        plan = plans_for(self.shards, pos, self.views)[self.worker.rank]
        epoch, segment = pos.epoch, pos.segment
        stream = ShardStream(
            self.store,
            plan,
            self.plan.cached,
            self.plan.partitions,
            lambda s: step_choice(self.plan, train, epoch, s, segment)[0],
            self.cfg.reader,
            start_step=pos.next_step,
            alloc=host_alloc(self.worker.device),
        )
        for batch in device_batches(stream, self.worker.device):
            t0 = time.perf_counter()
            step = batch.host.step
            _, resolution = step_choice(self.plan, train, epoch, step, segment)
            live_s = self.live_targets(batch)
            result = self.train_step(batch, resolution)
            if self.live:
                result.extra["live_teachers_s"] = live_s
            self.samples.step(epoch, step, self.global_step, batch.host.ids)
            self.pos = self.pos.after_step(step, self.global_step + 1)
            last_of_epoch = step == plan.steps - 1
            done = train.max_steps is not None and self.global_step >= train.max_steps
            if self.global_step % train.log_every == 0 or last_of_epoch:
                self.log_step(batch, resolution, result, time.perf_counter() - t0)
            self.worker.after_step(self.global_step)
            metrics = {"epoch": epoch, "global_step": self.global_step, **result.metrics}
            if last_of_epoch:
                self.checkpoint(self.pos.next_epoch(self.inputs, self.global_step), metrics)
            elif done or (train.checkpoint_every and self.global_step % train.checkpoint_every == 0):
                self.checkpoint(self.pos, metrics)
            self.worker.after_checkpoint(self.global_step)
            if done:
                return True
        return False

    def train_step(self, batch: DeviceBatch, resolution: int) -> StepResult:
        """Every student one optimizer step on this worker's share of the step's batch."""
        ctx, train = self.worker.ctx, self.cfg.train
        n_local = n_global = len(batch)
        if ctx.distributed:
            n_global = int(sum_over_workers([float(n_local)])[0])
        # DDP averages gradients over the workers: weighting each worker's mean loss by its share of the global
        # batch makes that average the global batch's mean (workers' batches differ at an epoch's end)
        scale = ctx.world * n_local / max(1, n_global)
        lr = lr_at(self.global_step, self.total_steps, train)
        sigma = L.damp_sigma(self.global_step, self.total_steps, train.damp_sigma, train.damp_schedule)
        images = to_images(batch.images, resolution)
        metrics: dict[str, float] = {}
        extra: dict[str, float] = {}
        seg = (self.pos.segment,) if self.pos.segment else ()
        for i, (name, st) in enumerate(self.students.items()):
            rng = np.random.default_rng(
                [train.seed & 0xFFFFFFFF, self.pos.epoch, *seg, batch.host.step, ctx.rank, i, 0x5F]
            )
            t0 = time.perf_counter()
            key = (name, resolution)
            counting = key not in self.flops and len(batch) > 0
            counter = FlopCounterMode(display=False) if counting else contextlib.nullcontext()
            with counter:
                outcome = student_step(
                    st,
                    images,
                    batch,
                    self.plan,
                    train,
                    rng,
                    lr,
                    sigma,
                    ctx.device,
                    loss_scale=scale,
                    update=n_global > 0,
                    dtype=self.dtype,
                    noise_seed=int(
                        np.random.SeedSequence(
                            [train.seed & 0xFFFFFFFF, self.pos.epoch, *seg, batch.host.step, i, 0xDA]
                        ).generate_state(1)[0]
                    ),  # no rank in it: the same on every worker
                )
            if counting:
                assert isinstance(counter, FlopCounterMode)
                self.flops[key] = float(counter.get_total_flops()) / len(batch)  # per sample
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            metrics.update({f"{name}/{k}": v for k, v in outcome.parts.items()})
            extra[f"{name}/grad_norm"] = outcome.grad_norm
            extra[f"{name}/step_s"] = spent = time.perf_counter() - t0
            extra[f"{name}/forward_s"] = outcome.forward_s
            extra[f"{name}/backward_s"] = outcome.backward_s
            extra[f"{name}/optimizer_s"] = outcome.optimizer_s
            extra[f"{name}/skipped"] = st.skipped
            if key in self.flops and len(batch) and not counting:  # the counted step ran slower: left out
                tflops = self.flops[key] * len(batch) / spent / 1e12
                extra[f"{name}/tflops"] = tflops
                if self.peak:
                    extra[f"{name}/mfu"] = tflops / self.peak
        if ctx.distributed:
            metrics = mean_over_workers(metrics, self.keys, n_local)
        return StepResult(metrics, extra, n_global, lr, sigma)

    def log_step(self, batch: DeviceBatch, resolution: int, result: StepResult, step_s: float) -> None:
        device = self.worker.device
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        self.worker.log(
            {
                "epoch": self.pos.epoch,
                "segment": self.pos.segment,
                "step": batch.host.step,
                "global_step": self.global_step,
                "total_steps": self.total_steps,
                "partition": batch.host.partition,
                "resolution": resolution,
                "images": result.images,
                "step_s": step_s,
                "samples_per_s": result.images / step_s if step_s > 0 else None,
                "read_wait_s": batch.host.read_wait_s,
                "h2d_s": batch.h2d_s,
                "peak_mem_gib": peak,
                "lr": result.lr,
                "damp_sigma": result.damp_sigma,
                **result.extra,
                **result.metrics,
            }
        )

    def checkpoint(self, pos: Position, metrics: dict[str, Any]) -> None:
        """Every student, optimizer and EMA, and the data position the next attempt resumes from."""
        states, shards = {}, {}
        for name, st in self.students.items():
            states[name], tensors = st.checkpoint_state()
            if tensors is not None:
                shards[name] = tensors
        self.worker.checkpoint(metrics, checkpoint_meta(pos, self.plan, list(self.students)), states, shards)

    def export(self) -> None:
        """Every student (or its EMA, ``train.export_ema``) under OUT/students/<name> with the teachers' PHI-S,
        written by rank 0 (every worker calls it: a sharded student's weights are gathered first)."""
        rank0 = self.worker.rank == 0
        phis = {t: self.store.phis(t) for t in self.plan.cached} if rank0 else {}
        phis.update({name: t.info.phis for name, t in self.live.items()})
        use_ema = self.cfg.train.export_ema
        for name, st in self.students.items():
            if not st.sharded:
                if rank0:
                    model = st.ema if (use_ema and st.ema is not None) else st.model
                    export_to(self.worker.out, name, model, phis, self.plan)
                continue
            weights, ema = st.export_states()
            if rank0:
                model = build_student(st.spec, self.plan.heads)
                model.load_state_dict(ema if (use_ema and ema is not None) else weights)
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
    for t, d in plan.dispersion.items():
        if (
            d is not None
            and d < L.DISPERSION_FLOOR
            and cfg.train.summary_weight > 0
            and cfg.train.summary_loss == "balanced"
        ):
            print(
                f"note: teacher {t}'s summaries barely vary (angular dispersion {d:.2g}); its balanced summary "
                f"loss divides by {L.DISPERSION_FLOOR} instead (a random-init or degenerate teacher?)",
                file=sys.stderr,
            )
    for spec in cfg.students:  # a bad file is named here, not by every worker of every retried attempt
        if spec.weights and Path(spec.weights).expanduser().exists():  # (a file only the workers see: theirs)
            check_weights_file(spec.weights, deep=True)
    out = RunDir(cfg.out, cfg.out_storage_options)
    resumed = check_relaunch(cfg, plan, plan.shard_rows(FeatureStore.from_config(cfg.store)), out)
    if resumed is not None:
        line = (
            f"resuming {cfg.out} at epoch {resumed['epoch']}, step {resumed['global_step']} "
            f"({resumed['remaining_in_epoch']} sample(s) of the epoch left)"
        )
        if "replanned_for" in resumed:
            line += f": planned for {resumed['plan']}, re-planned for {resumed['replanned_for']}"
        print(line, file=sys.stderr)
    init_ray(cfg.ray)
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
        "resumed": resumed,
        "last": last,
    }
