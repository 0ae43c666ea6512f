"""One training step of one student: the method's losses on the step's batch, backward, sync, update.

``student_losses`` wires the pure functions of ``radio_dist.train.losses`` (shift equivariance, PHI-S-space
spatial loss, balanced summary loss, MESA with the EMA student, DAMP weight noise) for one student;
``student_step`` runs its optimizer step. Every student of a job steps on the same batch, read once.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from radio_dist.train import losses as L
from radio_dist.train.config import TrainConfig
from radio_dist.train.parallel import (
    autocast,
    broadcast_module,
    data_parallel,
    full_state,
    fully_sharded,
    load_full_state,
    load_named_optimizer_state,
    make_adamw,
    named_optimizer_state,
)
from radio_dist.train.plan import RunPlan
from radio_dist.train.sharded import load_sharded, sharded_state
from radio_dist.train.students import (
    StudentModel,
    StudentOutput,
    StudentSpec,
    TeacherHeadInfo,
    build_student,
)
from radio_dist.train.transfer import DeviceBatch


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to 0 at ``total`` steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    rest = max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / rest)))


def to_images(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """A batch's uint8 NHWC views (on the device) as float NCHW in [0, 1], resized there to the step's
    resolution. An empty batch gives one zero image: the placeholder forward of a worker whose shards ran out."""
    if not len(images):
        return torch.zeros(1, 3, resolution, resolution, device=images.device)
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != resolution:
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True
        )
    return x


def student_resolution(resolution: int, patch: int) -> int:
    """The step's resolution rounded to a whole number of the student's patches."""
    return max(patch, int(round(resolution / patch)) * patch)


SHARDED_FORMAT = "dcp"  # a student checkpoint whose tensors are in a DCP directory beside it


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


class StudentState:
    """One student with its optimizer, (optional) EMA copy and data-parallel wrapper.

    ``model`` is the plain module (checkpointed, exported, the EMA's source); ``train_model`` is what the
    training forward runs — DDP around ``model`` when the workers share a process group, whose construction
    also gives every worker rank 0's initial weights. A student with ``parallel: fsdp`` is instead sharded in
    place by FSDP2 (``sharded``), its EMA alike; its checkpoints are sharded (``radio_dist.train.sharded``),
    its exports gathered whole.
    """

    def __init__(
        self,
        spec: StudentSpec,
        heads: dict[str, TeacherHeadInfo],
        cfg: TrainConfig,
        device: torch.device,
        distributed: bool = False,
        dtype: torch.dtype | None = None,
    ):
        torch.manual_seed(cfg.seed)
        self.spec = spec
        self.sharded = distributed and spec.parallel == "fsdp"
        self.model: StudentModel = build_student(spec, heads).to(device)
        if self.sharded:
            broadcast_module(self.model)
        else:
            self.train_model: torch.nn.Module = data_parallel(self.model, distributed, device)
        self.ema: StudentModel | None = None
        if cfg.mesa_weight > 0:  # after the wrapper: the EMA starts from rank 0's weights too
            self.ema = copy.deepcopy(self.model).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
        if self.sharded:
            fully_sharded(self.model, dtype)
            if self.ema is not None:
                fully_sharded(self.ema, dtype, reshard_root=True)
            self.train_model = self.model
        if spec.compile:  # around the wrapper: DDP's bucket hooks and FSDP2's gathers stay in the graph
            self.train_model = cast(torch.nn.Module, torch.compile(self.train_model))
        # DAMP's noise goes into the weights in place (instead of a functional forward with noisy copies) for
        # a sharded student (each worker its shard) and a compiled one (same parameters: no recompilation)
        self.damp_in_place = self.sharded or spec.compile
        self.opt = make_adamw(self.model.parameters(), cfg.lr, cfg.weight_decay, device)
        self.nonfinite_run = 0  # non-finite steps in a row (the guard)
        self.skipped = 0  # non-finite steps skipped in all

    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(state, shards): what rank 0 saves as the student's ``.pt`` — model, EMA, optimizer and guard —
        and None; for a sharded student only the optimizer's hyper-parameters and the guard, with this
        worker's shards of everything else for ``sharded.save_sharded`` (every rank must call it)."""
        guard = {"nonfinite_run": self.nonfinite_run, "skipped": self.skipped}
        if self.sharded:
            tensors, groups = sharded_state(self.model, self.opt, self.ema)
            return {"format": SHARDED_FORMAT, "param_groups": groups, "guard": guard}, tensors
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "opt": named_optimizer_state(self.model, self.opt),  # loads into a sharded student too
            "guard": guard,
        }
        return state, None

    def export_states(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(model, EMA) weights, whole (gathered on rank 0 for a sharded student; every rank must call it)."""
        if self.sharded:
            ema = full_state(self.ema)[0] if self.ema is not None else None
            return full_state(self.model)[0], ema
        return self.model.state_dict(), self.ema.state_dict() if self.ema is not None else None

    def load_state_dict(self, d: dict[str, Any], shards: Path | None = None) -> None:
        """Load a checkpoint written by ``checkpoint_state`` under any number of workers: a whole state (into
        a plain or a sharded student), or a sharded one from its DCP directory ``shards`` (re-sharded, or
        loaded whole into a plain student). Every rank must call it."""
        if d.get("format") == SHARDED_FORMAT:
            if shards is None:
                raise ValueError(f"a sharded checkpoint of student {self.spec.name!r} without its shards")
            load_sharded(self.model, self.opt, self.ema, shards, d["param_groups"])
        elif self.sharded:
            load_full_state(self.model, d["model"], self.opt, d["opt"])
            if self.ema is not None and d.get("ema") is not None:
                load_full_state(self.ema, d["ema"])
        else:
            self.model.load_state_dict(d["model"])
            if self.ema is not None and d.get("ema") is not None:
                self.ema.load_state_dict(d["ema"])
            load_named_optimizer_state(self.model, self.opt, d["opt"])
        guard = d.get("guard") or {}
        self.nonfinite_run = int(guard.get("nonfinite_run", 0))
        self.skipped = int(guard.get("skipped", 0))


def touch_outputs(out: StudentOutput) -> torch.Tensor:
    """0 x every output: added to a loss so that every parameter takes part in the backward pass (DDP
    all-reduces a gradient for each, also for heads a step's loss does not use)."""
    total = out.features.float().sum()
    for summary, dense in out.heads.values():
        total = total + dense.float().sum()
        if summary is not None:
            total = total + summary.float().sum()
    return total * 0.0


def student_losses(
    st: StudentState,
    images: torch.Tensor,
    batch: DeviceBatch,
    plan: RunPlan,
    cfg: TrainConfig,
    rng: np.random.Generator,
    damp_sigma: float,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The student's total loss on the step's batch (sum over teachers + MESA) and its parts.

    The forward runs under ``dtype`` autocast (None: fp32); the losses are computed in fp32."""
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
    with autocast(device, dtype):
        if damp_sigma > 0:  # through the DDP wrapper, so the noisy forward's gradients are all-reduced
            params = L.damp_params(st.train_model, damp_sigma)
            out = torch.func.functional_call(st.train_model, params, (xs,))
        else:
            out = st.train_model(xs)
    total = touch_outputs(out)
    parts: dict[str, float] = {}
    for t in plan.teachers:
        summary_pred, dense_pred = out.heads[t]
        dense_pred = dense_pred.float()
        summary_pred = summary_pred.float() if summary_pred is not None else None
        u = dense_pred.shape[1] // g
        target = batch.dense[t].float()  # fp16 as stored -> fp32 on the device
        target = L.resample_grid(target, (dense_pred.shape[1], dense_pred.shape[2]))
        ls = L.spatial_loss(dense_pred, target, (shift[0] * u, shift[1] * u))
        parts[f"{t}/spatial"] = float(ls.detach())
        total = total + cfg.spatial_weight * ls
        ys = batch.summary.get(t)
        if summary_pred is not None and ys is not None and cfg.summary_weight > 0:
            disp = L.effective_dispersion(plan.dispersion.get(t)) if cfg.summary_loss == "balanced" else 1.0
            la = L.balanced_summary_loss(summary_pred, ys.float(), disp)
            parts[f"{t}/summary"] = float(la.detach())
            total = total + cfg.summary_weight * la
    if st.ema is not None and cfg.mesa_weight > 0:
        shift_e = L.random_shift(rng, max_shift)
        with torch.no_grad(), autocast(device, dtype):
            ema_feats = st.ema(L.shift_image(x, shift_e, patch)).features
        lm = L.mesa_loss(out.features.float(), ema_feats.float(), shift, shift_e)
        parts["mesa"] = float(lm.detach())
        total = total + cfg.mesa_weight * lm
    parts["total"] = float(total.detach())
    return total, parts


@dataclass
class StepOutcome:
    """What one student's step did: its loss parts, gradient norm (before clipping), whether it stepped, and
    the seconds of its forward (with the losses), backward and optimizer phases (device synchronized)."""

    parts: dict[str, float]
    grad_norm: float
    stepped: bool
    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0


def student_step(
    st: StudentState,
    images: torch.Tensor,
    batch: DeviceBatch,
    plan: RunPlan,
    cfg: TrainConfig,
    rng: np.random.Generator,
    lr: float,
    damp_sigma: float,
    device: torch.device,
    loss_scale: float = 1.0,
    update: bool = True,
    dtype: torch.dtype | None = None,
    noise_seed: int | None = None,
) -> StepOutcome:
    """One optimizer step of one student on the step's batch.

    ``loss_scale`` weights this worker's mean loss so that DDP's average over the workers is the mean over
    the global batch (``world * n_local / n_global``). A worker whose shards ran out (an empty ``batch``)
    still runs the forward — on ``images``, a zero placeholder — with a zero loss, so DDP's all-reduce has
    every worker and the weights stay the same everywhere. ``update=False`` (no worker had a sample) skips
    the optimizer and EMA step. ``noise_seed``, the same on every worker, seeds the in-place DAMP noise of a
    compiled replicated student. A non-finite gradient norm (identical on every worker after the all-reduce)
    skips the step; ``cfg.max_nonfinite_steps`` of them in a row raise ``NonFiniteError``.
    """
    t0 = time.perf_counter()
    st.opt.zero_grad(set_to_none=True)
    for group in st.opt.param_groups:
        group["lr"] = lr
    parts: dict[str, float] = {}
    undo = None
    if st.damp_in_place and damp_sigma > 0:
        # replicas must draw the same noise (their gradients are averaged before undo scales them)
        gen = None if st.sharded or noise_seed is None else torch.Generator(device).manual_seed(noise_seed)
        undo = L.damp_in_place(st.model, damp_sigma, generator=gen)
    if len(batch):
        noise = 0.0 if st.damp_in_place else damp_sigma
        loss, parts = student_losses(st, images, batch, plan, cfg, rng, noise, device, dtype)
    else:
        res = student_resolution(images.shape[-1], st.model.patch_size)
        zeros = images.new_zeros(1, 3, res, res)
        with autocast(device, dtype):
            loss = touch_outputs(st.train_model(zeros))
            # a sharded EMA all-gathers too: in the order the other workers run it (MESA)
            if st.sharded and st.ema is not None and cfg.mesa_weight > 0:
                with torch.no_grad():
                    st.ema(zeros)
    t1 = _synced(device)
    (loss * loss_scale).backward()
    if undo is not None:
        undo()
    norm = torch.nn.utils.clip_grad_norm_(st.model.parameters(), cfg.grad_clip or math.inf)
    full_tensor = getattr(norm, "full_tensor", None)  # a sharded student's norm is a DTensor
    grad_norm = float(full_tensor() if full_tensor is not None else norm)  # (synchronizes the device)
    t2 = time.perf_counter()
    if not math.isfinite(grad_norm):
        st.nonfinite_run += 1
        st.skipped += 1
        if st.nonfinite_run >= cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"student {st.spec.name!r}: {st.nonfinite_run} steps in a row had a non-finite loss or gradient "
                f"(last loss parts {parts or 'n/a'}); lower train.lr, check the store with `radio-dist store "
                "verify`, or raise train.max_nonfinite_steps"
            )
        return StepOutcome(parts, grad_norm, False, t1 - t0, t2 - t1)
    st.nonfinite_run = 0
    if update:
        st.opt.step()
        if st.ema is not None:
            L.ema_update(st.ema, st.model, cfg.ema_momentum)
    return StepOutcome(parts, grad_norm, update, t1 - t0, t2 - t1, _synced(device) - t2)


def _synced(device: torch.device) -> float:
    """The host clock once the device has finished what was queued (phase timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
