"""Distillation losses and the C-RADIOv4 training tricks around them, as pure functions of tensors.

- **Stochastic resolutions** (:func:`sample_resolution`): each step draws a partition (low / high) and then a
  resolution from it, so the student never specializes to one input size ("mode switching").
- **Shift equivariance** (:func:`random_shift`, :func:`shift_image`, :func:`overlap`, :func:`spatial_loss`):
  student and teacher see views shifted independently by whole patches. Both views are windows of the same
  canvas (the image padded with ``fill`` without end), so token ``(i, j)`` of a view shifted by ``(sy, sx)``
  sees canonical token ``(i + sy, j + sx)``; the loss compares only tokens that see the same canonical token.
  The student cannot learn the teacher's fixed-position artifacts, because they move with the shift.
- **MESA** (:func:`mesa_loss`, :func:`ema_update`): an EMA copy of the student sees another shift; the
  student matches its layer-normalized features on the overlap, a flat-minimum regularizer.
- **DAMP** (:func:`damp_sigma`, :func:`damp_params`): multiplicative Gaussian weight noise ``w * (1 + sigma *
  eps)`` in the training forward pass (via ``torch.func.functional_call``), annealed to zero.
- **Balanced summary loss** (:func:`angle`, :func:`summary_dispersion`, :func:`balanced_summary_loss`):
  ``Theta(x, y)**2 / Disp(y)`` so that teachers whose summaries spread over different angular ranges
  (SigLIP2-g 0.694 vs DINOv3-7B 2.186) pull with comparable strength.

Conventions: dense maps are channels-last ``[B, h, w, C]``, images ``[B, 3, H, W]``, shifts ``(sy, sx)`` in
tokens. Losses are computed in at least float32 whatever the input dtype (bf16 autocast stays accurate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from radio_dist.phis import angular_dispersion

Shift = tuple[int, int]


# -- stochastic resolutions ---------------------------------------------------------------------------------
def sample_resolution(
    rng: np.random.Generator, sets: Mapping[str, Sequence[int]], weights: Mapping[str, float] | None = None
) -> tuple[str, int]:
    """Draw ``(partition, resolution)``: a partition by ``weights`` (equal by default), then a size uniformly.

    Weighting partitions rather than sizes keeps the high-resolution share fixed however many sizes each
    partition lists. ``weights``, when given, must name every partition (0 disables one).
    """
    if not sets:
        raise ValueError(
            "sample_resolution: `sets` is empty; give at least one partition, e.g. {'low': [224]}"
        )
    names = list(sets)
    for name in names:
        sizes = sets[name]
        if len(sizes) == 0:
            raise ValueError(f"sample_resolution: partition {name!r} has no resolutions; list at least one")
        bad = [r for r in sizes if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0]
        if bad:
            raise ValueError(
                f"sample_resolution: partition {name!r} has invalid resolutions {bad}; use ints > 0"
            )
    if weights is None:
        probs = np.full(len(names), 1.0 / len(names))
    else:
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"sample_resolution: weights name unknown partitions {unknown}; known: {names}")
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(
                f"sample_resolution: weights miss partitions {missing}; give each a weight (0 disables)"
            )
        w = np.array([float(weights[n]) for n in names], dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(
                f"sample_resolution: weights must be finite, >= 0 and not all 0, got {dict(weights)}"
            )
        probs = w / w.sum()
    name = names[int(rng.choice(len(names), p=probs))]
    sizes = sets[name]
    return name, int(sizes[int(rng.integers(len(sizes)))])


# -- shift equivariance -------------------------------------------------------------------------------------
def random_shift(rng: np.random.Generator, max_shift: int) -> Shift:
    """Uniform integer ``(sy, sx)`` in ``[-max_shift, max_shift]`` each."""
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"random_shift: max_shift must be an int >= 0, got {max_shift!r}")
    if max_shift == 0:
        return (0, 0)
    sy, sx = rng.integers(-int(max_shift), int(max_shift) + 1, size=2)
    return int(sy), int(sx)


def _check_shift(shift: Shift, what: str) -> Shift:
    if len(shift) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in shift):
        raise ValueError(f"{what} must be two ints (sy, sx) in tokens, got {shift!r}")
    return int(shift[0]), int(shift[1])


def _window(n: int, d: int) -> tuple[slice, slice]:
    """Slices ``(dst, src)`` of a length-``n`` axis such that ``dst[k] = src[k + d]`` where both exist."""
    lo, hi = max(0, -d), min(n, n - d)
    if lo >= hi:
        return slice(0, 0), slice(0, 0)
    return slice(lo, hi), slice(lo + d, hi + d)


def shift_image(images: Tensor, shift: Shift, patch: int, fill: float = 0.0) -> Tensor:
    """``out[..., y, x] = images[..., y + sy*patch, x + sx*patch]`` where in range, else ``fill``.

    This emulates a crop of the image padded with ``fill``: output token ``(i, j)`` sees canonical token
    ``(i + sy, j + sx)``. Same shape as ``images``; differentiable.
    """
    sy, sx = _check_shift(shift, "shift_image: shift")
    if patch < 1:
        raise ValueError(f"shift_image: patch must be >= 1 pixels, got {patch}")
    if images.ndim < 2:
        raise ValueError(f"shift_image: images must be [..., H, W], got shape {tuple(images.shape)}")
    if sy == 0 and sx == 0:
        return images
    h, w = images.shape[-2:]
    (dy, ry), (dx, rx) = _window(h, sy * patch), _window(w, sx * patch)
    out = torch.full_like(images, fill)
    out[..., dy, dx] = images[..., ry, rx]
    return out


def overlap(
    grid: tuple[int, int], shift_a: Shift, shift_b: Shift
) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices ``(into a, into b)`` of the tokens of two maps on ``grid`` that see the same canonical tokens.

    Token ``(i, j)`` of ``a`` sees canonical ``(i + ay, j + ax)`` and of ``b`` sees ``(i + by, j + bx)``, so
    ``a[i, j]`` pairs with ``b[i + ay - by, j + ax - bx]``. The selected regions are aligned element-wise.
    """
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1:
        raise ValueError(f"overlap: grid must be positive (h, w), got {grid!r}")
    ay, ax = _check_shift(shift_a, "overlap: shift_a")
    by, bx = _check_shift(shift_b, "overlap: shift_b")
    (a_y, b_y), (a_x, b_x) = _window(h, ay - by), _window(w, ax - bx)
    if a_y.stop == a_y.start or a_x.stop == a_x.start:
        raise ValueError(
            f"overlap: shifts {shift_a} and {shift_b} leave no common tokens on a {h}x{w} grid; "
            f"the relative shift must be smaller than the grid (lower max_shift)"
        )
    return (a_y, a_x), (b_y, b_x)


def resample_grid(t: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a channels-last map ``[B, h, w, C]`` to ``size``: bilinear up, antialiased bilinear down.

    Antialiasing when shrinking averages every input token instead of sampling a few, so a downsampled
    target keeps the mean of the fine one. Returns ``t`` itself when the size already matches.
    """
    if t.ndim != 4:
        raise ValueError(f"resample_grid: expected [B, h, w, C], got shape {tuple(t.shape)}")
    oh, ow = int(size[0]), int(size[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"resample_grid: size must be positive (H, W), got {size!r}")
    h, w = t.shape[1], t.shape[2]
    if (oh, ow) == (h, w):
        return t
    x = t.permute(0, 3, 1, 2)
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # bilinear/antialias kernels are not implemented for every dtype on every device
    down = oh < h or ow < w
    y = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=down)
    return y.to(t.dtype).permute(0, 2, 3, 1)


def _weighted_mean(per_sample: Tensor, weights: Tensor | None) -> Tensor:
    """``sum(w * l) / sum(w)``; zero-weight samples contribute nothing, all-zero weights give a connected 0."""
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise ValueError(
            f"weights must be per-sample {tuple(per_sample.shape)}, got shape {tuple(weights.shape)}"
        )
    w = weights.to(device=per_sample.device, dtype=per_sample.dtype)
    # `where` (not w * l) so a NaN in a zero-weight sample cannot leak; the clamp keeps sum(w) == 0 branch-free
    # (no host sync): the numerator is then exactly 0 and still part of the graph.
    num = torch.where(w > 0, w * per_sample, torch.zeros_like(per_sample)).sum()
    return num / w.sum().clamp_min(torch.finfo(w.dtype).tiny)


def _loss_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def spatial_loss(
    pred: Tensor,
    target: Tensor,
    shift_pred: Shift,
    shift_target: Shift = (0, 0),
    weights: Tensor | None = None,
) -> Tensor:
    """Mean squared error over the tokens both maps see, i.e. the shift-equivariant dense loss.

    ``pred`` and ``target`` are ``[B, h, w, C]`` on the same grid. ``weights`` (``[B]``, >= 0) weight each
    sample's MSE: ``sum(w_b * mse_b) / sum(w)``.
    """
    if pred.ndim != 4 or pred.shape != target.shape:
        raise ValueError(
            f"spatial_loss: pred and target must be [B, h, w, C] of one shape, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}; resample_grid the target first"
        )
    (pa_y, pa_x), (tb_y, tb_x) = overlap((pred.shape[1], pred.shape[2]), shift_pred, shift_target)
    dt = _loss_dtype(pred)
    diff = pred[:, pa_y, pa_x].to(dt) - target[:, tb_y, tb_x].to(dt)
    return _weighted_mean(diff.square().mean(dim=(1, 2, 3)), weights)


# -- balanced summary loss ----------------------------------------------------------------------------------
def angle(x: Tensor, y: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-row angle ``arccos(cos(x, y))`` in radians, shape ``[B]`` for ``[B, D]`` inputs.

    The cosine is clamped to ``[-1 + eps, 1 - eps]``: arccos has an infinite slope at +-1, which would turn
    a perfectly matched row into a NaN gradient.
    """
    if x.shape != y.shape or x.ndim < 1:
        raise ValueError(
            f"angle: x and y must be [..., D] of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"angle: eps must be in [0, 1), got {eps}")
    dt = torch.promote_types(_loss_dtype(x), y.dtype)
    xn = F.normalize(x.to(dt), dim=-1)
    yn = F.normalize(y.to(dt), dim=-1)
    cos = (xn * yn).sum(dim=-1)
    return torch.arccos(cos.clamp(-1.0 + eps, 1.0 - eps))


def summary_dispersion(y: Tensor | np.ndarray) -> float:
    """``Disp = E[Theta(y, mu_y)**2]`` with ``mu_y = E[y] / |E[y]|`` over the rows of ``y``, in float64.

    The same statistic as :func:`radio_dist.phis.angular_dispersion` (one implementation, so the value
    stored with a teacher's PHI-S fit and the one computed here cannot drift apart).
    """
    return angular_dispersion(y)


# Below this (radians²: summaries within ~0.1 rad of their mean direction) a teacher's summaries barely vary —
# a degenerate or random-init teacher — and Θ²/Disp would blow its summary loss up by the inverse; real
# teachers sit far above it (0.65 and 1.12 for the demo's, 0.69 and 2.19 in C-RADIOv4's Table 3).
DISPERSION_FLOOR = 1e-2


def effective_dispersion(dispersion: float | None) -> float:
    """The dispersion the balanced summary loss divides by: the teacher's, at least ``DISPERSION_FLOOR``
    (1 when it has none recorded)."""
    if dispersion is None or not math.isfinite(dispersion) or dispersion <= 0:
        return 1.0
    return max(float(dispersion), DISPERSION_FLOOR)


def _check_dispersion(dispersion: float) -> float:
    d = float(dispersion)
    if not math.isfinite(d) or d <= 0:
        raise ValueError(
            f"dispersion must be finite and > 0, got {dispersion}; compute it with summary_dispersion"
        )
    return d


def balanced_summary_loss(x: Tensor, y: Tensor, dispersion: float, weights: Tensor | None = None) -> Tensor:
    """Mean over rows of ``Theta(x, y)**2 / dispersion``: each teacher's summary loss in units of its spread."""
    d = _check_dispersion(dispersion)
    theta = angle(x, y)
    if theta.ndim != 1:
        raise ValueError(f"balanced_summary_loss: expected [B, D] summaries, got {tuple(x.shape)}")
    return _weighted_mean(theta.square() / d, weights)


# -- MESA ---------------------------------------------------------------------------------------------------
def layer_norm_noaffine(x: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim without learned scale/shift: MESA compares feature *shapes*, not scales."""
    return F.layer_norm(x, (x.shape[-1],), weight=None, bias=None, eps=eps)


def mesa_loss(student: Tensor, ema: Tensor, shift_student: Shift, shift_ema: Shift) -> Tensor:
    """Mean over the overlap of ``(LN(student) - LN(ema))**2``; the EMA side is a target (no gradient)."""
    if student.ndim != 4 or student.shape != ema.shape:
        raise ValueError(
            f"mesa_loss: student and ema must be [B, h, w, D] of one shape, got {tuple(student.shape)} and "
            f"{tuple(ema.shape)}"
        )
    return spatial_loss(
        layer_norm_noaffine(student), layer_norm_noaffine(ema.detach()), shift_student, shift_ema
    )


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, momentum: float) -> None:
    """``ema_p = m * ema_p + (1 - m) * p`` for every parameter; buffers (e.g. norm statistics) are copied."""
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"ema_update: momentum must be in [0, 1], got {momentum}")
    for kind, ours, theirs in (
        ("parameters", dict(ema.named_parameters()), dict(model.named_parameters())),
        ("buffers", dict(ema.named_buffers()), dict(model.named_buffers())),
    ):
        if ours.keys() != theirs.keys():
            diff = sorted(set(ours) ^ set(theirs))
            raise ValueError(
                f"ema_update: ema and model {kind} differ in names {diff}; the EMA must be a copy"
            )
        for name, e in ours.items():
            p = theirs[name]
            if e.shape != p.shape:
                raise ValueError(
                    f"ema_update: {kind[:-1]} {name!r} has shape {tuple(e.shape)} vs {tuple(p.shape)}"
                )
            src = p.detach().to(device=e.device, dtype=e.dtype)
            if kind == "parameters" and e.is_floating_point():
                e.lerp_(src, 1.0 - m)
            else:
                e.copy_(src)


# -- DAMP ---------------------------------------------------------------------------------------------------
DAMP_SCHEDULES = ("constant", "linear", "cosine")


def damp_sigma(step: int, total_steps: int, sigma0: float, schedule: str = "cosine") -> float:
    """DAMP noise std at ``step``: ``sigma0`` held ("constant") or annealed to 0 at ``total_steps``."""
    if total_steps < 1:
        raise ValueError(f"damp_sigma: total_steps must be >= 1, got {total_steps}")
    if not math.isfinite(sigma0) or sigma0 < 0:
        raise ValueError(f"damp_sigma: sigma0 must be finite and >= 0, got {sigma0}")
    frac = min(max(step, 0), total_steps) / total_steps
    if schedule == "constant":
        return float(sigma0)
    if schedule == "linear":
        return float(sigma0 * (1.0 - frac))
    if schedule == "cosine":
        return float(sigma0 * 0.5 * (1.0 + math.cos(math.pi * frac)))
    raise ValueError(f"damp_sigma: unknown schedule {schedule!r}; choose one of {DAMP_SCHEDULES}")


def damp_in_place(
    model: torch.nn.Module, sigma: float, skip_1d: bool = True, generator: torch.Generator | None = None
) -> Callable[[], None]:
    """DAMP for a student whose forward cannot take swapped parameters (sharded by FSDP2, or compiled):
    multiply each weight (this worker's shard of it) by ``1 + sigma * eps`` in place now; the returned
    ``undo()``, called after the backward pass, turns the gradient at the noisy weights into the gradient
    w.r.t. the clean ones (chain rule: times the same factor, elementwise) and puts the clean weights back bit
    for bit. Sharded: all workers gather the same noisy weights, so the step sees one noise sample across the
    data-parallel group. Replicated (DDP): the gradients are averaged before ``undo`` multiplies them, so
    every worker must draw the same noise — pass a ``generator`` seeded alike on all of them."""
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"damp_in_place: sigma must be finite and >= 0, got {sigma}")
    saved: list[tuple[torch.nn.Parameter, Tensor, Tensor]] = []
    with torch.no_grad():
        for p in model.parameters():
            if sigma == 0 or (skip_1d and p.ndim <= 1) or not p.is_floating_point():
                continue
            local = _local(p)
            eps = torch.randn(local.shape, generator=generator, device=local.device, dtype=local.dtype)
            xi = 1.0 + sigma * eps
            saved.append((p, local.clone(), xi))
            local.mul_(xi)

    def undo() -> None:
        with torch.no_grad():
            for p, clean, xi in saved:
                _local(p).copy_(clean)
                if p.grad is not None:
                    _local(p.grad).mul_(xi)

    return undo


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view of its storage), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def damp_params(
    model: torch.nn.Module, sigma: float, generator: torch.Generator | None = None, skip_1d: bool = True
) -> dict[str, Tensor]:
    """Noisy weights ``{name: p * (1 + sigma * eps)}``, ``eps ~ N(0, 1)`` drawn afresh, for one forward pass.

    Use with ``torch.func.functional_call(model, damp_params(model, s), args)``: the outputs are functions of
    the parameters, so the gradient reaching ``p`` is that of ``L(w * xi)`` w.r.t. ``w``. Parameters with
    ``ndim <= 1`` (biases, norm scales) stay clean when ``skip_1d``. ``sigma == 0`` returns the parameters.
    """
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"damp_params: sigma must be finite and >= 0, got {sigma}")
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if sigma == 0 or (skip_1d and p.ndim <= 1) or not p.is_floating_point():
            out[name] = p
            continue
        dev = generator.device if generator is not None else p.device
        eps = torch.randn(p.shape, generator=generator, device=dev, dtype=p.dtype).to(p.device)
        out[name] = p * (1.0 + sigma * eps)
    return out
