"""Losses and training tricks against hand-computed values and independent references (numpy float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from radio_dist.train import losses as L
from radio_dist.train.losses import (
    angle,
    balanced_summary_loss,
    damp_params,
    damp_sigma,
    ema_update,
    layer_norm_noaffine,
    mesa_loss,
    overlap,
    random_shift,
    resample_grid,
    sample_resolution,
    shift_image,
    spatial_loss,
    summary_dispersion,
)

PATCH = 4


def patchify(images: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/p, W/p, C*p*p]: one row per token, so a token's pixels compare as one vector."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // patch, w // patch, c * patch * patch)


def canonical_ids(h: int, w: int) -> np.ndarray:
    return np.arange(h * w).reshape(h, w)


def shifted_ids(ids: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
    """Independent reference of a shifted view: token (i, j) holds canonical id (i+sy, j+sx), -1 outside."""
    h, w = ids.shape
    out = np.full_like(ids, -1)
    for i in range(h):
        for j in range(w):
            ci, cj = i + shift[0], j + shift[1]
            if 0 <= ci < h and 0 <= cj < w:
                out[i, j] = ids[ci, cj]
    return out


# -- stochastic resolutions ---------------------------------------------------------------------------------
SETS = {"low": [128, 192], "high": [512, 768, 1024]}


def test_sample_resolution_default_is_equal_per_partition_then_uniform():
    rng = np.random.default_rng(0)
    n = 12000
    draws = [sample_resolution(rng, SETS) for _ in range(n)]
    assert all(r in SETS[p] for p, r in draws)
    low = sum(p == "low" for p, _ in draws) / n
    assert low == pytest.approx(0.5, abs=0.02)  # not 2/5, which weighting by list length would give
    freq = {r: sum(d == r for _, d in draws) / n for r in [128, 192, 512, 768, 1024]}
    for r in (128, 192):
        assert freq[r] == pytest.approx(0.25, abs=0.02)
    for r in (512, 768, 1024):
        assert freq[r] == pytest.approx(1 / 6, abs=0.02)


def test_sample_resolution_weights_and_determinism():
    rng = np.random.default_rng(1)
    n = 8000
    draws = [sample_resolution(rng, SETS, {"low": 3.0, "high": 1.0}) for _ in range(n)]
    assert sum(p == "low" for p, _ in draws) / n == pytest.approx(0.75, abs=0.02)
    only_high = {sample_resolution(rng, SETS, {"low": 0.0, "high": 2.0})[0] for _ in range(200)}
    assert only_high == {"high"}
    a = [sample_resolution(np.random.default_rng(7), SETS) for _ in range(5)]
    b = [sample_resolution(np.random.default_rng(7), SETS) for _ in range(5)]
    assert a == b
    assert all(isinstance(r, int) for _, r in draws[:50])


@pytest.mark.parametrize(
    "sets, weights, match",
    [
        ({}, None, "empty"),
        ({"low": [128], "high": []}, None, "'high'"),
        ({"low": [128, 0]}, None, "'low'"),
        (SETS, {"low": 1.0, "hgih": 1.0}, "hgih"),
        (SETS, {"low": 1.0}, "high"),
        (SETS, {"low": -1.0, "high": 1.0}, "weights"),
        (SETS, {"low": 0.0, "high": 0.0}, "weights"),
    ],
)
def test_sample_resolution_rejects_bad_input(sets, weights, match):
    with pytest.raises(ValueError, match=match):
        sample_resolution(np.random.default_rng(0), sets, weights)


def test_random_shift_range_and_coverage():
    rng = np.random.default_rng(0)
    assert random_shift(rng, 0) == (0, 0)
    shifts = [random_shift(rng, 2) for _ in range(2000)]
    ys = {s[0] for s in shifts}
    xs = {s[1] for s in shifts}
    assert ys == xs == {-2, -1, 0, 1, 2}
    assert all(isinstance(v, int) for s in shifts[:20] for v in s)
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(rng, -1)


# -- shift equivariance -------------------------------------------------------------------------------------
def test_shift_image_direction_and_fill():
    img = torch.randn(2, 3, 6 * PATCH, 5 * PATCH)
    out = shift_image(img, (1, 2), PATCH, fill=-7.0)
    assert out.shape == img.shape
    tok, src = patchify(out), patchify(img)
    # token (i, j) of the output sees canonical token (i + 1, j + 2)
    torch.testing.assert_close(tok[:, 0, 0], src[:, 1, 2], rtol=0, atol=0)
    torch.testing.assert_close(tok[:, :5, :3], src[:, 1:, 2:], rtol=0, atol=0)
    assert torch.all(tok[:, 5:] == -7.0) and torch.all(tok[:, :, 3:] == -7.0)
    neg = patchify(shift_image(img, (-2, -1), PATCH))
    torch.testing.assert_close(neg[:, 2:, 1:], src[:, :4, :4], rtol=0, atol=0)
    assert torch.all(neg[:, :2] == 0) and torch.all(neg[:, :, :1] == 0)
    assert torch.all(shift_image(img, (6, 0), PATCH) == 0)
    torch.testing.assert_close(shift_image(img, (0, 0), PATCH), img)


def test_shift_image_is_differentiable():
    img = torch.randn(1, 3, 3 * PATCH, 3 * PATCH, requires_grad=True)
    shift_image(img, (1, -1), PATCH).sum().backward()
    assert img.grad is not None
    # exactly the pixels that moved into the view receive gradient
    expected = torch.zeros(3 * PATCH, 3 * PATCH)
    expected[PATCH:, : 2 * PATCH] = 1
    torch.testing.assert_close(img.grad[0, 0], expected)


@pytest.mark.parametrize("sa, sb", [((0, 0), (0, 0)), ((1, 2), (0, 0)), ((-2, 1), (2, -1)), ((2, 0), (1, 0))])
def test_shift_image_then_overlap_recovers_identical_tokens(sa, sb):
    h, w = 7, 6
    img = torch.randn(2, 3, h * PATCH, w * PATCH)
    a = patchify(shift_image(img, sa, PATCH))
    b = patchify(shift_image(img, sb, PATCH))
    (ay, ax), (by, bx) = overlap((h, w), sa, sb)
    ra, rb = a[:, ay, ax], b[:, by, bx]
    assert ra.shape[1:3] == (h - abs(sa[0] - sb[0]), w - abs(sa[1] - sb[1]))
    torch.testing.assert_close(ra, rb, rtol=0, atol=0)


@pytest.mark.parametrize(
    "sa, sb", [((0, 0), (1, 1)), ((2, -3), (-1, 2)), ((3, 3), (3, 3)), ((-1, 0), (2, 2))]
)
def test_overlap_selects_every_shared_canonical_token(sa, sb):
    h, w = 6, 8
    ids = canonical_ids(h, w)
    a, b = shifted_ids(ids, sa), shifted_ids(ids, sb)
    (ay, ax), (by, bx) = overlap((h, w), sa, sb)
    ra, rb = a[ay, ax], b[by, bx]
    np.testing.assert_array_equal(ra, rb)
    # maximal: every canonical id visible in both views is selected
    shared = set(a[a >= 0].tolist()) & set(b[b >= 0].tolist())
    assert shared <= set(ra[ra >= 0].tolist())


def test_overlap_too_large_shift_raises():
    with pytest.raises(ValueError, match="no common tokens"):
        overlap((4, 4), (2, 0), (-2, 0))
    with pytest.raises(ValueError, match="no common tokens"):
        overlap((4, 4), (0, 0), (0, 5))
    overlap((4, 4), (0, 0), (3, -3))  # one row/column still overlaps


def test_resample_grid_identity_and_constant_fields():
    t = torch.randn(2, 5, 7, 3)
    assert resample_grid(t, (5, 7)) is t
    const = torch.full((2, 6, 6, 4), 2.5)
    for size in [(12, 18), (3, 2), (9, 4), (1, 1)]:
        out = resample_grid(const, size)
        assert out.shape == (2, *size, 4) and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.full_like(out, 2.5))
    with pytest.raises(ValueError, match="B, h, w, C"):
        resample_grid(torch.zeros(5, 7, 3), (2, 2))


def test_resample_grid_upsamples_bilinear_and_downsamples_with_antialias():
    t = torch.randn(2, 4, 5, 3)
    up = resample_grid(t, (8, 10))
    ref = torch.nn.functional.interpolate(
        t.permute(0, 3, 1, 2), size=(8, 10), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(up, ref.permute(0, 2, 3, 1))
    # spikes every 4th token: point sampling would see only zeros, averaging keeps the mean (1/16) inside
    spikes = torch.zeros(1, 32, 32, 1)
    spikes[:, ::4, ::4] = 1.0
    down = resample_grid(spikes, (8, 8))
    torch.testing.assert_close(down[0, 1:-1, 1:-1, 0], torch.full((6, 6), 1 / 16))
    half = resample_grid(torch.randn(1, 8, 8, 2, dtype=torch.bfloat16), (4, 4))
    assert half.dtype == torch.bfloat16


def test_spatial_loss_zero_when_aligned_positive_when_not():
    h, w = 6, 6
    img = torch.randn(3, 3, h * PATCH, w * PATCH)
    proj = torch.randn(3 * PATCH * PATCH, 5)
    # a pointwise "network" is exactly shift-equivariant: features follow their patch
    sp, st = (1, -2), (-1, 0)
    pred = patchify(shift_image(img, sp, PATCH)) @ proj
    target = patchify(shift_image(img, st, PATCH)) @ proj
    assert spatial_loss(pred, target, sp, st).item() == pytest.approx(0.0, abs=1e-10)
    assert spatial_loss(pred, target, (0, 0), (0, 0)).item() > 0.1
    assert spatial_loss(pred, target, st, sp).item() > 0.1


def test_spatial_loss_value_and_weights():
    torch.manual_seed(0)
    pred = torch.randn(3, 4, 5, 2, requires_grad=True)
    target = torch.randn(3, 4, 5, 2)
    loss = spatial_loss(pred, target, (1, 0), (0, 2))
    # pred token (i, j) sees (i+1, j); target token (k, l) sees (k, l+2): pairs pred[i, j] ~ target[i+1, j-2]
    ref = ((pred[:, 0:3, 2:5] - target[:, 1:4, 0:3]) ** 2).mean()
    torch.testing.assert_close(loss, ref)
    per = ((pred[:, 0:3, 2:5] - target[:, 1:4, 0:3]) ** 2).mean(dim=(1, 2, 3))
    w = torch.tensor([2.0, 0.0, 1.0])
    torch.testing.assert_close(spatial_loss(pred, target, (1, 0), (0, 2), w), (2 * per[0] + per[2]) / 3)
    # a zero-weight sample contributes nothing, even a non-finite one
    bad = target.clone()
    bad[1] = float("nan")
    torch.testing.assert_close(spatial_loss(pred, bad, (1, 0), (0, 2), w), (2 * per[0] + per[2]) / 3)
    zero = spatial_loss(pred, target, (1, 0), (0, 2), torch.zeros(3))
    assert zero.item() == 0.0
    zero.backward()
    assert pred.grad is not None and torch.all(pred.grad == 0)
    with pytest.raises(ValueError, match="per-sample"):
        spatial_loss(pred, target, (0, 0), (0, 0), torch.ones(2))
    with pytest.raises(ValueError, match="resample_grid"):
        spatial_loss(pred, target[:, :3], (0, 0))


# -- balanced summary loss ----------------------------------------------------------------------------------
def numpy_angle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return np.arccos(np.clip(cos, -1.0, 1.0))


def test_angle_matches_numpy_float64():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 17)), rng.normal(size=(64, 17))
    y[:4] = -3 * x[:4] + 1e-3 * rng.normal(size=(4, 17))  # near-antiparallel rows
    ref = numpy_angle(x, y)
    got64 = angle(torch.from_numpy(x), torch.from_numpy(y))
    assert got64.dtype == torch.float64 and got64.shape == (64,)
    np.testing.assert_allclose(got64.numpy(), ref, atol=2e-3)  # the clamp bounds |error| near +-1
    np.testing.assert_allclose(got64.numpy()[4:], ref[4:], rtol=1e-10)
    got32 = angle(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy()[4:], ref[4:], rtol=1e-4, atol=1e-5)


def test_angle_gradient_is_finite_at_parallel_and_antiparallel():
    x = torch.randn(3, 8, requires_grad=True)
    y = torch.stack([x[0].detach() * 2, -x[1].detach(), torch.randn(8)])
    theta = angle(x, y)
    assert theta[0].item() < 2e-3 and math.pi - theta[1].item() < 2e-3
    theta.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_summary_dispersion_known_values():
    same = np.tile(np.array([[0.3, -1.0, 2.0]]), (5, 1))
    assert summary_dispersion(same) == pytest.approx(0.0, abs=1e-12)
    # two orthogonal unit vectors: mu = (1, 1)/sqrt(2), each at pi/4, so Disp = (pi/4)**2
    assert summary_dispersion(np.eye(2)) == pytest.approx((math.pi / 4) ** 2, rel=1e-12)
    assert summary_dispersion(torch.eye(2, dtype=torch.float32)) == pytest.approx(math.pi**2 / 16, rel=1e-7)
    # scale-free per row: lengths do not change angles, but they shift the mean direction (E[y], not E[y/|y|])
    assert summary_dispersion(np.array([[1.0, 0.0], [0.0, 3.0]])) != pytest.approx(math.pi**2 / 16, rel=1e-3)
    assert isinstance(summary_dispersion(np.eye(3)), float)


def test_balanced_summary_loss_scales_as_inverse_dispersion():
    torch.manual_seed(0)
    x, y = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10)
    l1 = balanced_summary_loss(x, y, 1.0)
    torch.testing.assert_close(l1, angle(x, y).square().mean())
    torch.testing.assert_close(balanced_summary_loss(x, y, 0.5), 2 * l1)
    torch.testing.assert_close(balanced_summary_loss(x, y, 2.186), l1 / 2.186)
    w = torch.tensor([1.0, 0, 0, 0, 0, 3.0])
    theta2 = angle(x, y).square()
    torch.testing.assert_close(balanced_summary_loss(x, y, 0.694, w), (theta2[0] + 3 * theta2[5]) / 4 / 0.694)
    l1.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="dispersion"):
            balanced_summary_loss(x, y, bad)


# -- MESA ---------------------------------------------------------------------------------------------------
def test_layer_norm_noaffine_matches_torch_layer_norm():
    x = torch.randn(2, 3, 4, 16) * 5 + 2
    ref = torch.nn.LayerNorm(16, eps=1e-6, elementwise_affine=False)(x)
    out = layer_norm_noaffine(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 3, 4), atol=1e-4, rtol=0)


def test_mesa_loss_gradient_reaches_student_only():
    h, w, d = 5, 5, 8
    canvas = torch.randn(2, h + 4, w + 4, d)  # features on a larger canvas, so every view token is real
    ss, se = (1, -1), (-2, 2)

    def view(s: tuple[int, int]) -> torch.Tensor:
        return canvas[:, 2 + s[0] : 2 + s[0] + h, 2 + s[1] : 2 + s[1] + w].clone()

    student = view(ss).requires_grad_(True)
    # per-token affine change of the EMA features: LN removes it, so aligned views cost nothing
    ema = (3.0 * view(se) + 0.5).requires_grad_(True)
    assert mesa_loss(student, ema, ss, se).item() == pytest.approx(0.0, abs=1e-8)
    loss = mesa_loss(student, ema, ss, (0, 0))
    assert loss.item() > 0.1
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert ema.grad is None


def test_ema_update_math():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    model(torch.randn(8, 4))  # move running stats away from their initial values
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, model, 0.9)
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(ema.named_parameters())[name], 0.9 * before[name] + 0.1 * p.detach())
    for name, b in model.named_buffers():
        torch.testing.assert_close(dict(ema.named_buffers())[name], b)
    assert all(p.grad_fn is None for p in ema.parameters())
    keep = {k: v.clone() for k, v in ema.state_dict().items()}
    ema_update(ema, model, 1.0)
    for name, p in ema.named_parameters():
        torch.testing.assert_close(p, keep[name], rtol=0, atol=0)
    ema_update(ema, model, 0.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(ema.named_parameters())[name], p.detach(), rtol=0, atol=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="momentum"):
            ema_update(ema, model, bad)
    with pytest.raises(ValueError, match="names"):
        ema_update(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(4, 3), 0.5)


# -- DAMP ---------------------------------------------------------------------------------------------------
def test_damp_sigma_schedules():
    assert damp_sigma(0, 100, 0.2) == pytest.approx(0.2)
    assert damp_sigma(50, 100, 0.2) == pytest.approx(0.1)
    assert damp_sigma(100, 100, 0.2) == pytest.approx(0.0, abs=1e-15)
    assert damp_sigma(25, 100, 0.2, "cosine") == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert damp_sigma(25, 100, 0.2, "linear") == pytest.approx(0.15)
    assert damp_sigma(100, 100, 0.2, "linear") == 0.0
    assert damp_sigma(77, 100, 0.2, "constant") == 0.2
    assert damp_sigma(-5, 100, 0.2, "linear") == pytest.approx(0.2)  # clamped to [0, total]
    assert damp_sigma(500, 100, 0.2, "linear") == 0.0
    with pytest.raises(ValueError, match="schedule"):
        damp_sigma(0, 100, 0.2, "exp")
    with pytest.raises(ValueError, match="total_steps"):
        damp_sigma(0, 0, 0.2)
    with pytest.raises(ValueError, match="sigma0"):
        damp_sigma(0, 10, -0.1)


def test_damp_sigma_zero_is_the_plain_forward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 2))
    params = damp_params(model, 0.0)
    assert all(params[n] is p for n, p in model.named_parameters())
    x = torch.randn(4, 6)
    torch.testing.assert_close(functional_call(model, params, (x,)), model(x), rtol=0, atol=0)


def test_damp_gradient_through_functional_call_is_the_noise_scaled_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(7, 5)
    sigma = 0.3
    noisy = damp_params(lin, sigma, generator=torch.Generator().manual_seed(1))
    assert noisy["bias"] is lin.bias  # 1-d parameters stay clean
    xi = (noisy["weight"] / lin.weight).detach()  # 1 + sigma * eps
    functional_call(lin, noisy, (x,)).sum().backward()
    # L = sum(x @ (W * xi).T + b)  =>  dL/dW = xi * (1 x.sum(0)^T), dL/db = 7
    expected = xi * x.sum(0).expand(3, 5)
    assert lin.weight.grad is not None and lin.bias.grad is not None
    torch.testing.assert_close(lin.weight.grad, expected)
    torch.testing.assert_close(lin.bias.grad, torch.full((3,), 7.0))
    assert not torch.allclose(lin.weight.grad, x.sum(0).expand(3, 5))  # the noise did enter


def test_damp_noise_statistics_and_freshness():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256))
    gen = torch.Generator().manual_seed(0)
    sigma = 0.05
    a = damp_params(model, sigma, generator=gen)
    b = damp_params(model, sigma, generator=gen)
    w = model[0].weight
    eps_a = (a["0.weight"] / w - 1).detach() / sigma
    assert eps_a.std().item() == pytest.approx(1.0, abs=0.02)
    assert eps_a.mean().item() == pytest.approx(0.0, abs=0.02)
    assert not torch.equal(a["0.weight"], b["0.weight"])  # fresh noise each call
    assert a["1.weight"] is model[1].weight and a["0.bias"] is model[0].bias
    c = damp_params(model, sigma, generator=gen, skip_1d=False)
    assert not torch.equal(c["0.bias"], model[0].bias) and not torch.equal(c["1.weight"], model[1].weight)
    again = damp_params(model, sigma, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["0.weight"], a["0.weight"], rtol=0, atol=0)  # reproducible with a seed
    with pytest.raises(ValueError, match="sigma"):
        damp_params(model, -0.1)


def test_a_teacher_whose_summaries_barely_vary_does_not_blow_up_the_summary_loss() -> None:
    # a random-init tiny DINOv3 gives nearly the same CLS token for every image: dispersion ~1e-12
    assert L.effective_dispersion(1e-12) == L.DISPERSION_FLOOR
    assert L.effective_dispersion(0.645) == 0.645  # a real teacher's is used as it is
    assert L.effective_dispersion(None) == 1.0 and L.effective_dispersion(0.0) == 1.0
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    loss = L.balanced_summary_loss(x, y, L.effective_dispersion(1e-12))
    assert float(loss) <= math.pi**2 / L.DISPERSION_FLOOR
