"""One training step of one student: the method's losses on the step's batch, backward, sync, update.

``student_losses`` wires the pure functions of ``radio_dist.train.losses`` (shift equivariance, PHI-S-space
spatial loss, balanced summary loss, MESA with the EMA student, DAMP weight noise) for one student;
``student_step`` runs its optimizer step. Every student of a job steps on the same batch, read once.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from radio_dist.train import losses as L
from radio_dist.train.config import TrainConfig
from radio_dist.train.gradsync import all_reduce_grads
from radio_dist.train.plan import RunPlan
from radio_dist.train.reader import Batch
from radio_dist.train.students import StudentModel, StudentSpec, TeacherHeadInfo, build_student


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to 0 at ``total`` steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    rest = max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / rest)))


def to_images(batch: Batch, resolution: int, device: torch.device) -> torch.Tensor:
    """The batch's uint8 views as float NCHW in [0, 1] on ``device``, resized to the step's resolution."""
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
    plan: RunPlan,
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
    for t in plan.teachers:
        summary_pred, dense_pred = out.heads[t]
        u = dense_pred.shape[1] // g
        target = torch.from_numpy(batch.dense[t]).to(device).float()  # fp16 as stored -> fp32 on the device
        target = L.resample_grid(target, (dense_pred.shape[1], dense_pred.shape[2]))
        ls = L.spatial_loss(dense_pred, target, (shift[0] * u, shift[1] * u))
        parts[f"{t}/spatial"] = float(ls.detach())
        total = total + cfg.spatial_weight * ls
        ys = batch.summary.get(t)
        if summary_pred is not None and ys is not None and cfg.summary_weight > 0:
            disp = plan.dispersion.get(t) or 1.0
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


def student_step(
    st: StudentState,
    images: torch.Tensor | None,
    batch: Batch,
    plan: RunPlan,
    cfg: TrainConfig,
    rng: np.random.Generator,
    lr: float,
    damp_sigma: float,
    device: torch.device,
    grad_scale: float = 1.0,
    distributed: bool = False,
    update: bool = True,
) -> dict[str, float]:
    """One optimizer step of one student on the step's batch; returns its loss parts.

    ``grad_scale`` (this worker's share of the global batch) weights the loss so that gradients summed over
    the workers are the global mean. A worker whose shards ran out passes ``images=None``: it still joins
    the gradient all-reduce (with zeros) and takes the step, so every worker's weights stay the same.
    ``update=False`` (no worker had a sample) skips the optimizer and EMA step.
    """
    st.opt.zero_grad(set_to_none=False)
    for group in st.opt.param_groups:
        group["lr"] = lr
    parts: dict[str, float] = {}
    if images is not None:
        loss, parts = student_losses(st, images, batch, plan, cfg, rng, damp_sigma, device)
        (loss * grad_scale).backward()
    else:
        for p in st.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    if distributed:
        all_reduce_grads(st.model)
    if update:
        st.opt.step()
        if st.ema is not None:
            L.ema_update(st.ema, st.model, cfg.ema_momentum)
    return parts
