"""Multi-student distillation from a feature store with Ray Train.

Every Ray Train worker streams its share of the store's shards (``radio_dist.ingest``) and, each step, every
student trains on the same batch: the targets are read once per step however many students there are. The
method's ingredients (stochastic resolution, shift equivariance, PHI-S-space spatial loss, balanced summary
loss, shift-equivariant MESA with an EMA student, DAMP weight noise) are pure functions in
``radio_dist.losses``; this module wires them into ``train_loop_per_worker`` and ``run_distill``.

Resumption: a checkpoint holds every student, optimizer and EMA, plus the data position (epoch, next step) in
the deterministic per-epoch plan. A restarted worker (``FailureConfig``) or a re-launched job (same ``out``)
continues from there, so each sample of an epoch is trained on exactly once; ``OUT/samples/rank-*.jsonl``
is an audit log of which ids each step saw, per attempt.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from radio_dist import losses as L
from radio_dist.config import StrictModel
from radio_dist.ingest import (
    Batch,
    ReaderConfig,
    ShardStream,
    committed_shards,
    epoch_plan,
    shards_digest,
)
from radio_dist.pipeline import RayConfig, _init_ray
from radio_dist.store import FeatureStore, StoreConfig, StoreError, StoreMismatchError
from radio_dist.students import StudentModel, StudentSpec, TeacherHeadInfo, build_student, export_student


class ExpectedTeacher(StrictModel):
    fingerprint: str | None = Field(None, description="Teacher fingerprint the job was configured for.")
    phis_sha256: str | None = Field(None, description="sha256 of the teacher's PHI-S parameter file.")


class TrainConfig(StrictModel):
    """The optimisation and the method's switches (each ingredient can be turned off)."""

    epochs: int = Field(2, ge=1, description="Passes over the store.")
    batch_size: int = Field(16, ge=1, description="Images per worker per step.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps in total (benchmarks).")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (every student).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps, then cosine decay to 0.")
    resolutions: dict[str, list[int]] | None = Field(
        None,
        description="Stochastic resolution: partition -> student resolutions (px) sampled per step. "
        "Default: each trained partition at its cached size only.",
    )
    partition_weights: dict[str, float] | None = Field(
        None, description="Probability weight of each partition per step (default equal)."
    )
    max_shift: int = Field(
        1, ge=0, description="Shift equivariance: max student shift in whole patches (0 = off)."
    )
    spatial_weight: float = Field(1.0, ge=0, description="Weight of the PHI-S-space dense loss.")
    summary_weight: float = Field(1.0, ge=0, description="Weight of the balanced summary loss Θ²/Disp.")
    mesa_weight: float = Field(
        0.1, ge=0, description="Weight of shift-equivariant MESA (0 = off, no EMA model)."
    )
    ema_momentum: float = Field(0.99, ge=0, le=1, description="EMA student momentum (for MESA).")
    damp_sigma: float = Field(
        0.05, ge=0, description="DAMP multiplicative weight-noise std at step 0 (0 = off)."
    )
    damp_schedule: str = Field("cosine", description="DAMP annealing: constant | linear | cosine.")
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every N steps (0: at epoch ends only).")
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps.")
    seed: int = Field(0, description="Seeds the data order, resolutions, shifts and initial weights.")
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default: its CPUs).")
    export_ema: bool = Field(False, description="Export the EMA students instead of the trained ones.")

    @field_validator("damp_schedule")
    @classmethod
    def _schedule(cls, v: str) -> str:
        if v not in {"constant", "linear", "cosine"}:
            raise ValueError(f"damp_schedule must be constant, linear or cosine, got {v!r}")
        return v


class ScalingSettings(StrictModel):
    """How many Ray Train workers and what each gets; only values change between laptop and cluster."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    max_failures: int = Field(2, ge=-1, description="Worker failures recovered from the last checkpoint.")


class DebugSettings(StrictModel):
    """Fault injection for the tests that prove nothing is lost or duplicated."""

    kill_at_step: int | None = Field(None, ge=0, description="SIGKILL one worker at this global step, once.")
    kill_rank: int = Field(0, ge=0, description="Which worker kill_at_step kills.")
    stop_after_step: int | None = Field(
        None,
        ge=0,
        description="Raise after this global step (simulates a job that stops and is re-launched).",
    )


def default_students() -> list[StudentSpec]:
    """The built-in family: a small C-RADIO student plus two smaller timm students (CPU-sized)."""
    return [
        StudentSpec(
            name="cradio",
            kind="cradio",
            arch="tiny",
            overrides={"embed_dim": 192, "depth": 4, "num_heads": 3},
            head_hidden=256,
        ),
        StudentSpec(
            name="vit_tiny",
            kind="timm",
            arch="vit_tiny_patch16_224",
            overrides={"depth": 4},
            head_hidden=256,
        ),
        StudentSpec(name="convnext_atto", kind="timm", arch="convnext_atto", head_hidden=256),
    ]


class DistillConfig(StrictModel):
    """A `distill` job: store in, students out. The same file runs on a laptop and on a cluster."""

    store: StoreConfig = Field(description="The feature store to train from.")
    out: str = Field(description="Run directory (local path or fsspec URL): checkpoints, metrics, exports.")
    out_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for `out` (S3 endpoint, credentials, ...)."
    )
    name: str = Field("distill", description="Run name (Ray Train run under OUT/ray).")
    students: list[StudentSpec] = Field(
        default_factory=default_students, description="Students trained together on every batch."
    )
    teachers: list[str] | None = Field(None, description="Teachers to distill (default: all in the store).")
    partitions: list[str] | None = Field(None, description="Cached partitions to train on (default: all).")
    expect: dict[str, ExpectedTeacher] = Field(
        default_factory=dict, description="Refuse a store whose teachers do not match these."
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and method switches.")
    reader: ReaderConfig = Field(default_factory=ReaderConfig, description="Store reading.")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings, description="Ray Train workers.")
    ray: RayConfig = Field(
        # Ray Train's placement-group monitor polls the state API, which a dashboard-less local instance lacks,
        # and would flood the terminal; worker logs stay in Ray's session logs and errors reach the driver.
        default_factory=lambda: RayConfig(log_to_driver=False),
        description="Ray cluster connection.",
    )
    debug: DebugSettings = Field(default_factory=DebugSettings, description="Fault injection (tests).")

    @model_validator(mode="after")
    def _unique_students(self) -> DistillConfig:
        names = [s.name for s in self.students]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"students must be a non-empty list with unique names, got {names}")
        return self


# -- the plan every worker agrees on ---------------------------------------------------------------------------


def prepare_run(cfg: DistillConfig) -> dict[str, Any]:
    """Check the store against the job and fix what the run trains on (raises StoreMismatchError)."""
    store = FeatureStore.from_config(cfg.store)
    meta = store.meta()
    have = sorted(meta["teachers"])
    teachers = cfg.teachers or have
    problems = []
    for t in teachers:
        if t not in meta["teachers"]:
            problems.append(f"teacher {t!r} is not in the store (it has {have})")
    for t, exp in sorted(cfg.expect.items()):
        rec = meta["teachers"].get(t)
        if rec is None:
            problems.append(f"expected teacher {t!r} is not in the store (it has {have})")
            continue
        if exp.fingerprint and rec.get("fingerprint") != exp.fingerprint:
            problems.append(
                f"teacher {t!r}: fingerprint {rec.get('fingerprint')} in the store, {exp.fingerprint} expected "
                "(its spec or weights differ)"
            )
        sha = (rec.get("phis") or {}).get("sha256")
        if exp.phis_sha256 and sha != exp.phis_sha256:
            problems.append(
                f"teacher {t!r}: PHI-S parameters sha256 {sha} in the store, {exp.phis_sha256} expected"
            )
    partitions = cfg.partitions or sorted(meta["partitions"])
    for p in partitions:
        if p not in meta["partitions"]:
            problems.append(f"partition {p!r} is not in the store (it has {sorted(meta['partitions'])})")
    for t in teachers:
        if t in meta["teachers"] and "phis" not in meta["teachers"][t]:
            problems.append(f"teacher {t!r} has no PHI-S parameters yet (the caching job never fitted them)")
    if problems:
        raise StoreMismatchError(
            f"store {store.url} does not match this distillation job:\n  - " + "\n  - ".join(problems)
        )
    resolutions = cfg.train.resolutions or {p: [int(meta["partitions"][p])] for p in partitions}
    for p, rs in resolutions.items():
        if p not in partitions:
            raise StoreMismatchError(
                f"train.resolutions names partition {p!r}, which this job does not train on"
            )
        if not rs or any(r < 16 for r in rs):
            raise StoreMismatchError(
                f"train.resolutions[{p!r}] must be a non-empty list of sizes >= 16, got {rs}"
            )
    shards = committed_shards(store)
    if not shards:
        raise StoreError(
            f"store {store.url} has no committed images yet — run `radio-dist cache-teachers` first"
        )
    heads = {}
    dispersion = {}
    for t in teachers:
        rec = meta["teachers"][t]
        outs = rec["outputs"][partitions[0]]
        summary = outs.get("summary")
        heads[t] = {"summary_dim": int(summary[-1]) if summary else None, "dense_dim": int(outs["dense"][-1])}
        dispersion[t] = rec.get("summary_dispersion")
    return {
        "teachers": teachers,
        "partitions": partitions,
        "resolutions": resolutions,
        "heads": heads,
        "dispersion": dispersion,
        "fingerprints": {t: meta["teachers"][t]["fingerprint"] for t in teachers},
        "phis_sha256": {t: meta["teachers"][t]["phis"]["sha256"] for t in teachers},
        "shards": [s.shard for s in shards],
        "digest": shards_digest(shards),
        "rows": sum(len(s.ids) for s in shards),
    }


def step_choice(run: dict[str, Any], train: TrainConfig, epoch: int, step: int) -> tuple[str, int]:
    """(partition, resolution) of one step: a pure function of the seed, identical on every worker."""
    rng = np.random.default_rng([train.seed & 0xFFFFFFFF, epoch, step, 0xDE5])
    return L.sample_resolution(rng, run["resolutions"], train.partition_weights)


# -- one training step ---------------------------------------------------------------------------------------


def _lr(step: int, total: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    rest = max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / rest)))


def _to_images(batch: Batch, resolution: int, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(batch.images).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != resolution:
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
    return x


def student_resolution(resolution: int, patch: int) -> int:
    """The step's resolution rounded to a whole number of the student's patches."""
    return max(patch, int(round(resolution / patch)) * patch)


class StudentState:
    """One student with its optimizer and (optional) EMA copy."""

    def __init__(
        self, spec: StudentSpec, heads: dict[str, TeacherHeadInfo], cfg: TrainConfig, device: torch.device
    ):
        torch.manual_seed(cfg.seed)
        self.spec = spec
        self.model: StudentModel = build_student(spec, heads).to(device)
        self.ema: StudentModel | None = None
        if cfg.mesa_weight > 0:
            self.ema = copy.deepcopy(self.model).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "opt": self.opt.state_dict(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.model.load_state_dict(d["model"])
        if self.ema is not None and d.get("ema") is not None:
            self.ema.load_state_dict(d["ema"])
        self.opt.load_state_dict(d["opt"])


def student_losses(
    st: StudentState,
    images: torch.Tensor,
    batch: Batch,
    run: dict[str, Any],
    cfg: TrainConfig,
    rng: np.random.Generator,
    damp_sigma: float,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The student's total loss on the step's batch (sum over teachers + MESA) and its parts."""
    patch = st.model.patch_size
    res = student_resolution(images.shape[-1], patch)
    x = (
        images
        if images.shape[-1] == res
        else F.interpolate(images, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
    )
    g = res // patch
    max_shift = min(cfg.max_shift, max(0, (g - 1) // 2))  # student vs EMA differ by <= 2*max_shift < g
    shift = L.random_shift(rng, max_shift)
    xs = L.shift_image(x, shift, patch)
    if damp_sigma > 0:
        params = L.damp_params(st.model, damp_sigma)
        out = torch.func.functional_call(st.model, params, (xs,))
    else:
        out = st.model(xs)
    total = torch.zeros((), device=device)
    parts: dict[str, float] = {}
    for t in run["teachers"]:
        summary_pred, dense_pred = out.heads[t]
        u = dense_pred.shape[1] // g
        target = torch.from_numpy(batch.dense[t]).to(device).float()  # fp16 as stored -> fp32 on the device
        target = L.resample_grid(target, (dense_pred.shape[1], dense_pred.shape[2]))
        ls = L.spatial_loss(dense_pred, target, (shift[0] * u, shift[1] * u))
        parts[f"{t}/spatial"] = float(ls.detach())
        total = total + cfg.spatial_weight * ls
        ys = batch.summary.get(t)
        if summary_pred is not None and ys is not None and cfg.summary_weight > 0:
            disp = run["dispersion"].get(t) or 1.0
            la = L.balanced_summary_loss(summary_pred, torch.from_numpy(ys).to(device), float(disp))
            parts[f"{t}/summary"] = float(la.detach())
            total = total + cfg.summary_weight * la
    if st.ema is not None and cfg.mesa_weight > 0:
        shift_e = L.random_shift(rng, max_shift)
        with torch.no_grad():
            ema_feats = st.ema(L.shift_image(x, shift_e, patch)).features
        lm = L.mesa_loss(out.features, ema_feats, shift, shift_e)
        parts["mesa"] = float(lm.detach())
        total = total + cfg.mesa_weight * lm
    parts["total"] = float(total.detach())
    return total, parts


def _mean_over_workers(
    metrics: dict[str, float], keys: list[str], n_local: int, distributed: bool
) -> dict[str, float]:
    """Sample-weighted mean of the step's losses over all workers (a worker with an empty batch adds 0)."""
    if not distributed:
        return metrics
    import torch.distributed as dist

    vec = torch.tensor([metrics.get(k, 0.0) * n_local for k in keys] + [float(n_local)], dtype=torch.float64)
    dist.all_reduce(vec)
    n = vec[-1].item()
    return {k: float(v / n) for k, v in zip(keys, vec[:-1].tolist(), strict=True)} if n else {}


def _all_reduce_grads(model: torch.nn.Module) -> None:
    import torch.distributed as dist

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i : i + n].view_as(g))
        i += n


def _broadcast_params(model: torch.nn.Module) -> None:
    import torch.distributed as dist

    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


# -- the Ray Train loop ---------------------------------------------------------------------------------------


class RunDir:
    """A run directory (``out``): a local path or an fsspec URL with its storage options."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def open(self, rel: str, mode: str) -> Any:
        if "w" in mode or "a" in mode:
            self.fs.makedirs(self.path(rel).rsplit("/", 1)[0], exist_ok=True)
        return self.fs.open(self.path(rel), mode)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def touch(self, rel: str) -> None:
        with self.open(rel, "w") as f:
            f.write(str(time.time()))

    def read_lines(self, rel: str) -> list[str]:
        if not self.exists(rel):
            return []
        return bytes(self.fs.cat_file(self.path(rel))).decode().splitlines()


class RunLog:
    """An append-only JSON-lines log in a run directory.

    Local: appended and flushed line by line. Object stores cannot append, so the log is kept in a local file
    (seeded with what the store already holds) and uploaded whole by ``sync()`` — the training loop syncs at
    every checkpoint, so what an object store holds is exactly what the last checkpoint covers; lines after it
    belong to steps a restart rolls back anyway.
    """

    def __init__(self, run: RunDir, rel: str) -> None:
        self.run, self.rel = run, rel
        if run.is_local:
            self._f = run.open(rel, "a")
            self._tmp = None
        else:
            self._tmp = tempfile.NamedTemporaryFile("w+", suffix=".jsonl", delete=False)  # noqa: SIM115
            for line in run.read_lines(rel):
                self._tmp.write(line + "\n")
            self._f = self._tmp

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def sync(self) -> None:
        if self._tmp is not None:
            self._tmp.flush()
            self.run.fs.makedirs(self.run.path(self.rel).rsplit("/", 1)[0], exist_ok=True)
            self.run.fs.put_file(self._tmp.name, self.run.path(self.rel))

    def close(self) -> None:
        self.sync()
        self._f.close()
        if self._tmp is not None:
            os.unlink(self._tmp.name)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: every worker trains every student on its share of each step."""
    import ray.train
    import torch.distributed as dist

    cfg = DistillConfig.model_validate(config["cfg"])
    run = config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    device = (
        torch.device("cuda") if cfg.scaling.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    )
    torch.set_num_threads(cfg.train.threads or max(1, int(cfg.scaling.cpus_per_worker)))

    store = FeatureStore.from_config(cfg.store)
    shards_now = {s.shard: s for s in committed_shards(store)}
    missing = [s for s in run["shards"] if s not in shards_now]
    if missing:
        raise StoreError(
            f"store {store.url}: {len(missing)} shard(s) of this run are gone (e.g. {missing[0]})"
        )
    shards = [shards_now[s] for s in run["shards"]]
    if shards_digest(shards) != run["digest"]:
        raise StoreError(f"store {store.url}: the shards of this run changed under it")

    heads = {t: TeacherHeadInfo(**h) for t, h in run["heads"].items()}
    students = {s.name: StudentState(s, heads, cfg.train, device) for s in cfg.students}
    epoch, next_step, global_step = 0, 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
            if state["digest"] != run["digest"] or state["fingerprints"] != run["fingerprints"]:
                raise StoreMismatchError(
                    "the checkpoint was trained on other data or teachers than the store now holds "
                    f"(digest {state['digest']} vs {run['digest']}); use a new --out"
                )
            for name, st in students.items():
                st.load_state_dict(
                    torch.load(Path(d) / f"{name}.pt", map_location=device, weights_only=False)
                )
            epoch, next_step, global_step = state["epoch"], state["next_step"], state["global_step"]
    elif distributed:
        for st in students.values():
            _broadcast_params(st.model)
            if st.ema is not None:
                st.ema.load_state_dict(st.model.state_dict())

    metric_keys = [
        f"{s.name}/{part}"
        for s in cfg.students
        for part in (
            [f"{t}/spatial" for t in run["teachers"]]
            + [
                f"{t}/summary"
                for t in run["teachers"]
                if run["heads"][t]["summary_dim"] and cfg.train.summary_weight > 0
            ]
            + (["mesa"] if cfg.train.mesa_weight > 0 else [])
            + ["total"]
        )
    ]
    plans0 = epoch_plan(shards, 0, cfg.train.seed, world, cfg.train.batch_size, cfg.reader.shuffle_shards)
    per_epoch = plans0[0].steps
    total_steps = cfg.train.max_steps or per_epoch * cfg.train.epochs
    out = RunDir(cfg.out, cfg.out_storage_options)
    samples_log = RunLog(out, f"samples/rank-{rank}.jsonl")
    samples_log.write({"start": [epoch, next_step], "pid": os.getpid(), "time": time.time()})
    samples_log.sync()
    metrics_log = RunLog(out, "metrics.jsonl") if rank == 0 else None

    def checkpoint(epoch_: int, next_step_: int, metrics: dict[str, Any]) -> None:
        samples_log.sync()
        if metrics_log is not None:
            metrics_log.sync()
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as d:
            for name, st in students.items():
                torch.save(st.state_dict(), Path(d) / f"{name}.pt")
            state = {
                "epoch": epoch_,
                "next_step": next_step_,
                "global_step": global_step,
                "digest": run["digest"],
                "fingerprints": run["fingerprints"],
            }
            (Path(d) / "state.json").write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    done = False
    while epoch < cfg.train.epochs and not done:
        plan = epoch_plan(
            shards, epoch, cfg.train.seed, world, cfg.train.batch_size, cfg.reader.shuffle_shards
        )[rank]
        stream = ShardStream(
            store,
            plan,
            run["teachers"],
            run["partitions"],
            lambda s, e=epoch: step_choice(run, cfg.train, e, s)[0],
            cfg.reader,
            start_step=next_step,
        )
        for batch in stream:
            t0 = time.perf_counter()
            step = batch.step
            _, resolution = step_choice(run, cfg.train, epoch, step)
            n_local = len(batch)
            n_global = n_local
            if distributed:
                nt = torch.tensor([n_local], dtype=torch.float64)
                dist.all_reduce(nt)
                n_global = int(nt.item())
            lr = _lr(global_step, total_steps, cfg.train)
            sigma = L.damp_sigma(global_step, total_steps, cfg.train.damp_sigma, cfg.train.damp_schedule)
            step_metrics: dict[str, float] = {}
            images = _to_images(batch, resolution, device) if n_local else None
            for i, (name, st) in enumerate(students.items()):
                st.opt.zero_grad(set_to_none=False)
                for group in st.opt.param_groups:
                    group["lr"] = lr
                if images is not None:
                    rng = np.random.default_rng([cfg.train.seed & 0xFFFFFFFF, epoch, step, rank, i, 0x5F])
                    loss, parts = student_losses(st, images, batch, run, cfg.train, rng, sigma, device)
                    (loss * (n_local / max(1, n_global))).backward()
                    for k, v in parts.items():
                        step_metrics[f"{name}/{k}"] = v
                else:  # a worker whose shards ran out still joins the gradient all-reduce with zeros
                    for p in st.model.parameters():
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                if distributed:
                    _all_reduce_grads(st.model)
                if n_global:
                    st.opt.step()
                    if st.ema is not None:
                        L.ema_update(st.ema, st.model, cfg.train.ema_momentum)
            step_metrics = _mean_over_workers(step_metrics, metric_keys, n_local, distributed)
            samples_log.write({"epoch": epoch, "step": step, "ids": batch.ids})
            global_step += 1
            last_of_epoch = step == plan.steps - 1
            if metrics_log is not None and (global_step % cfg.train.log_every == 0 or last_of_epoch):
                metrics_log.write(
                    {
                        "epoch": epoch,
                        "step": step,
                        "global_step": global_step,
                        "total_steps": total_steps,
                        "partition": batch.partition,
                        "resolution": resolution,
                        "images": n_global,
                        "step_s": time.perf_counter() - t0,
                        "read_wait_s": batch.read_wait_s,
                        "lr": lr,
                        "damp_sigma": sigma,
                        **step_metrics,
                    }
                )
            if cfg.debug.kill_at_step is not None and global_step == cfg.debug.kill_at_step + 1:
                marker = f"killed-{cfg.debug.kill_at_step}"
                if rank == cfg.debug.kill_rank and not out.exists(marker):
                    out.touch(marker)
                    os.kill(os.getpid(), signal.SIGKILL)
            done = cfg.train.max_steps is not None and global_step >= cfg.train.max_steps
            if last_of_epoch:
                checkpoint(epoch + 1, 0, {"epoch": epoch, "global_step": global_step, **step_metrics})
            elif done or (cfg.train.checkpoint_every and global_step % cfg.train.checkpoint_every == 0):
                checkpoint(epoch, step + 1, {"epoch": epoch, "global_step": global_step, **step_metrics})
            if cfg.debug.stop_after_step is not None and global_step == cfg.debug.stop_after_step + 1:
                marker = f"stopped-{cfg.debug.stop_after_step}-rank{rank}"
                if not out.exists(marker):
                    out.touch(marker)
                    raise RuntimeError(f"debug.stop_after_step: stopping after global step {global_step - 1}")
            if done:
                break
        else:
            epoch, next_step = epoch + 1, 0
            continue
        break

    samples_log.close()
    if metrics_log is not None:
        metrics_log.close()
    if rank == 0:
        store_phis = {t: store.phis(t) for t in run["teachers"]}
        for name, st in students.items():
            model = st.ema if (cfg.train.export_ema and st.ema is not None) else st.model
            export_to(out, name, model, store_phis, run)


def export_to(out: RunDir, name: str, model: StudentModel, phis: dict[str, Any], run: dict[str, Any]) -> None:
    """Export one student under OUT/students/<name> (written locally, then copied for remote outs)."""
    extra = {"fingerprints": run["fingerprints"], "phis_sha256": run["phis_sha256"], "digest": run["digest"]}
    dest = out.path(f"students/{name}")
    model = model.to("cpu")
    if out.is_local:
        export_student(model, dest, phis=phis, extra=extra)
        return
    with tempfile.TemporaryDirectory() as d:
        export_student(model, d, phis=phis, extra=extra)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                out.fs.makedirs(f"{dest}/{f.relative_to(d).parent}".rstrip("/."), exist_ok=True)
                out.fs.put_file(str(f), f"{dest}/{f.relative_to(d)}")


# -- the driver ------------------------------------------------------------------------------------------------


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
    import threading

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
        follower = threading.Thread(target=_follow, args=(out, on_metrics, stop, step_key), daemon=True)
        follower.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        if follower is not None:
            follower.join(timeout=5)


def run_distill(
    cfg: DistillConfig, on_metrics: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Check the store, start Ray Train, follow its metrics; returns a summary of the run."""
    # Ray Train workers run in their own directory: local paths must not be relative to ours
    local = {
        k: str(Path(v).resolve()) for k, v in (("url", cfg.store.url), ("out", cfg.out)) if "://" not in v
    }
    if "url" in local:
        cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"url": local["url"]})})
    if "out" in local:
        cfg = cfg.model_copy(update={"out": local["out"]})
    run = prepare_run(cfg)
    _init_ray(cfg.ray)
    out = RunDir(cfg.out, cfg.out_storage_options)
    out.fs.makedirs(out.root, exist_ok=True)
    with out.open("run.json", "w") as f:
        f.write(json.dumps({"config": cfg.model_dump(mode="json"), "run": run}, indent=1))
    t0 = time.perf_counter()
    result = fit_with_ray_train(
        train_loop_per_worker,
        {"cfg": cfg.model_dump(mode="json"), "run": run},
        out,
        cfg.name,
        cfg.scaling,
        on_metrics,
    )
    lines = read_metrics(cfg.out, cfg.out_storage_options)
    last = lines[-1] if lines else {}
    return {
        "out": cfg.out,
        "students": [s.name for s in cfg.students],
        "teachers": run["teachers"],
        "rows": run["rows"],
        "global_step": last.get("global_step", 0),
        "wall_s": time.perf_counter() - t0,
        "checkpoint": str(result.checkpoint.path) if result.checkpoint else None,
        "last": last,
    }


def read_metrics(
    out: str | RunDir, storage_options: dict[str, Any] | None = None, step_key: str = "global_step"
) -> list[dict[str, Any]]:
    """The run's metrics, one dict per logged step; steps re-run after a restart keep their latest line."""
    run = out if isinstance(out, RunDir) else RunDir(out, storage_options)
    lines = [json.loads(line) for line in run.read_lines("metrics.jsonl") if line.strip()]
    latest = {line[step_key]: line for line in lines}
    return [latest[k] for k in sorted(latest)]


def _follow(out: RunDir, on_metrics: Callable[[dict[str, Any]], None], stop: Any, step_key: str) -> None:
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


def sample_audit(out: str, storage_options: dict[str, Any] | None = None) -> dict[int, dict[str, int]]:
    """Which ids the surviving training history saw, per epoch: {epoch: {id: times}}.

    Each worker logs a ``start`` line (the position it resumed from) and one line per step. Steps an attempt
    ran after the position the next attempt resumed from were rolled back with the checkpoint, so they are
    not counted. A clean run has every committed id exactly once per epoch.
    """
    run = RunDir(out, storage_options)
    files = sorted(run.fs.glob(run.path("samples/rank-*.jsonl")))
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
