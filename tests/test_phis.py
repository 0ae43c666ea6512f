"""PHI-S against an independent float64 reference (numpy.cov + numpy.linalg.eigh computed directly)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from radio_dist.phis import (
    Moments,
    PhiS,
    angular_dispersion,
    fit_phis,
    hadamard_matrix,
    orthogonal_fallback,
)


def anisotropic(n: int, dim: int, seed: int = 0, lo: float = -1.0, hi: float = 2.0) -> np.ndarray:
    """Correlated features: z @ A with singular values spread over 10**lo..10**hi, plus an offset."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    w, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = u @ np.diag(np.logspace(lo, hi, dim)) @ w.T
    return rng.normal(size=(n, dim)) @ a + rng.normal(scale=5.0, size=dim)


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, population covariance, eigenvalues descending) computed directly."""
    cov = np.cov(x, rowvar=False, bias=True)
    return x.mean(axis=0), cov, np.sort(np.clip(np.linalg.eigvalsh(cov), 0, None))[::-1]


# -- moments ------------------------------------------------------------------------------------------------
def test_merged_chunks_equal_one_pass():
    x = anisotropic(601, 12, seed=1)
    sizes = [0, 1, 7, 200, 0, 93, 300]
    assert sum(sizes) == len(x)
    parts = [Moments.from_features(c) for c in np.split(x, np.cumsum(sizes)[:-1])]
    # left fold and a tree reduction (as workers would merge) must agree with the one-pass statistics
    folded = Moments.empty(12)
    for p in parts:
        folded = folded.merge(p)
    left = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3]))
    tree = left.merge(parts[4].merge(parts[5].merge(parts[6])))
    mean, cov, _ = reference(x)
    for m in (folded, tree):
        assert m.count == len(x)
        np.testing.assert_allclose(m.mean, mean, rtol=0, atol=1e-10)
        np.testing.assert_allclose(m.covariance(), cov, rtol=1e-10, atol=1e-10 * np.abs(cov).max())


def test_moments_flatten_leading_dims_torch_and_round_trip():
    x = anisotropic(4 * 5 * 6, 8, seed=2)
    grid = x.reshape(4, 5, 6, 8)
    a = Moments.from_features(grid)
    b = Moments.from_features(torch.from_numpy(grid))
    assert a.dim == 8 and a.count == b.count == 120
    np.testing.assert_allclose(b.mean, a.mean, atol=1e-12)
    np.testing.assert_allclose(b.m2, a.m2, rtol=1e-12)
    np.testing.assert_allclose(a.covariance(), reference(x)[1], rtol=1e-10, atol=1e-10)
    c = Moments.from_arrays(a.to_arrays())
    assert c.count == a.count and np.array_equal(c.mean, a.mean) and np.array_equal(c.m2, a.m2)
    e = Moments.empty(8).merge(a)  # empty + x == x
    assert e.count == a.count and np.array_equal(e.mean, a.mean) and np.array_equal(e.m2, a.m2)


def test_moment_errors():
    with pytest.raises(ValueError, match="dim 3.*dim 4"):
        Moments.empty(3).merge(Moments.empty(4))
    with pytest.raises(ValueError, match="at least 2"):
        Moments.from_features(np.ones((1, 5))).covariance()
    with pytest.raises(ValueError, match="at least 2"):
        fit_phis(Moments.empty(5))
    with pytest.raises(ValueError, match="constant"):
        fit_phis(Moments.from_features(np.full((50, 6), 0.1) + np.arange(6)))


# -- rotations ----------------------------------------------------------------------------------------------
def assert_orthogonal(h: np.ndarray, n: int) -> None:
    assert h.shape == (n, n) and h.dtype == np.float64
    cols = np.random.default_rng(n).choice(n, size=min(n, 64), replace=False)  # a column subset keeps it fast
    np.testing.assert_allclose(h.T @ h[:, cols], np.eye(n)[:, cols], atol=1e-12)
    np.testing.assert_allclose(h[cols] @ h.T, np.eye(n)[cols], atol=1e-12)


@pytest.mark.parametrize("n", list(range(1, 130)) + [200, 252, 768, 1024, 1280, 1536, 4096])
def test_hadamard_matrix(n):
    h = hadamard_matrix(n)
    must_exist = {1, 2, 4, 8, 12, 20, 24, 28, 40, 64, 128, 768, 1024, 1280, 1536, 4096}
    impossible = n in {3, 6, 10} or (n % 2 == 1 and n > 1) or (n > 2 and n % 4 != 0)
    if n in must_exist:
        assert h is not None
    if impossible:
        assert h is None
    if h is not None:
        assert_orthogonal(h, n)
        assert np.all(np.abs(np.abs(h) - 1 / math.sqrt(n)) < 1e-15)


def test_orthogonal_fallback_is_deterministic():
    q = orthogonal_fallback(30, seed=3)
    assert_orthogonal(q, 30)
    assert np.array_equal(q, orthogonal_fallback(30, seed=3))
    assert not np.allclose(q, orthogonal_fallback(30, seed=4))


# -- PHI-S --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dim,kind", [(64, "hadamard"), (20, "hadamard"), (12, "hadamard"), (30, "orthogonal")]
)
def test_forward_standardizes_every_dimension(dim, kind):
    x = anisotropic(4000, dim, seed=dim)
    phis = fit_phis(Moments.from_features(x))
    mean, cov, lam = reference(x)
    assert phis.rotation_kind == kind and phis.dim == dim
    assert np.all(np.diff(phis.eigvals) <= 0) and phis.eigvals.min() >= 0
    np.testing.assert_allclose(phis.eigvals, lam, rtol=1e-9, atol=1e-9 * lam[0])
    assert phis.alpha == pytest.approx(1 / math.sqrt(lam.mean()), rel=1e-10)
    y = phis.forward(x)
    assert y.dtype == np.float64 and y.shape == x.shape
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-9)
    var = y.var(axis=0)
    assert var.mean() == pytest.approx(1.0, abs=1e-9)  # trace is preserved by any rotation
    if kind == "hadamard":
        np.testing.assert_allclose(var, 1.0, atol=1e-9)
    else:  # a random rotation only spreads variance approximately evenly; tolerance stated for this seed
        assert 0.5 < var.min() and var.max() < 2.0
    # PHI-S is not whitening: the output covariance is alpha^2 H Lambda H^T
    h = phis.rotation
    expected = (h * lam) @ h.T / lam.mean()
    np.testing.assert_allclose(np.cov(y, rowvar=False, bias=True), expected, atol=1e-9)
    assert not np.allclose(expected, np.eye(dim), atol=0.1)
    np.testing.assert_allclose(phis.weight @ phis.inverse_weight, np.eye(dim), atol=1e-10)


def test_rank_deficient_features_still_unit_variance():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 16))  # rank 8 in 16 dims
    phis = fit_phis(Moments.from_features(x))
    assert phis.eigvals.min() >= 0 and np.count_nonzero(phis.eigvals > 1e-8) == 8
    np.testing.assert_allclose(phis.forward(x).var(axis=0), 1.0, atol=1e-9)
    np.testing.assert_allclose(phis.inverse(phis.forward(x)), x, atol=1e-9)


def test_inverse_round_trip_numpy_and_torch_agree():
    x = anisotropic(300, 20, seed=5)
    phis = fit_phis(Moments.from_features(x))
    scale = np.abs(x).max()
    np.testing.assert_allclose(phis.inverse(phis.forward(x)), x, atol=1e-10 * scale)
    xt = torch.from_numpy(x.reshape(3, 100, 20)).to(torch.float32)
    yt = phis.forward(xt)
    assert yt.dtype == torch.float32 and yt.shape == (3, 100, 20) and yt.device == xt.device
    np.testing.assert_allclose(yt.reshape(-1, 20).numpy(), phis.forward(x), atol=2e-4)
    back = phis.inverse(yt)
    assert back.dtype == torch.float32
    np.testing.assert_allclose(back.reshape(-1, 20).numpy(), x, atol=1e-5 * scale)
    # bf16 input is promoted, and the float32 parameters are built once per device
    assert phis.forward(xt.to(torch.bfloat16)).dtype == torch.float32
    assert phis._torch_params(xt.device, False)[0] is phis._torch_params(xt.device, False)[0]
    with pytest.raises(ValueError, match=r"\[\.\.\., 20\]"):
        phis.forward(np.zeros((4, 21)))


def test_save_load_and_pickle_round_trip(tmp_path):
    x = anisotropic(200, 30, seed=6)
    phis = fit_phis(Moments.from_features(x))
    path = tmp_path / "phis.safetensors"
    phis.save(str(path))
    loaded = PhiS.load(str(path))
    assert loaded.rotation_kind == "orthogonal" and loaded.alpha == phis.alpha
    for name in ("mean", "eigvecs", "eigvals", "rotation"):
        assert np.array_equal(getattr(loaded, name), getattr(phis, name))
    small = fit_phis(Moments.from_features(x[:, :12]))
    assert PhiS.from_arrays(small.to_arrays()).rotation_kind == "hadamard"

    xt = torch.from_numpy(x).to(torch.float32)
    y = phis.forward(xt)  # fills the torch cache, which must not be pickled
    blob = pickle.dumps(phis)
    assert b"torch" not in blob
    clone = pickle.loads(blob)
    assert torch.equal(clone.forward(xt), y)
    np.testing.assert_array_equal(clone.inverse(phis.forward(x)), phis.inverse(phis.forward(x)))

    # Ray deserializes numpy arrays read-only (zero-copy); the torch path must not warn (warnings are errors)
    arrays = phis.to_arrays()
    for a in arrays.values():
        a.setflags(write=False)
    frozen = PhiS.from_arrays(arrays)
    assert torch.allclose(frozen.forward(xt), y) and torch.allclose(frozen.inverse(y), phis.inverse(y))


# -- angular dispersion -------------------------------------------------------------------------------------
def reference_dispersion(y: np.ndarray) -> float:
    """Angles via atan2(|rejection|, projection), a formula independent of arccos."""
    u = y.mean(axis=0)
    u = u / np.linalg.norm(u)
    angles = []
    for row in y:
        along = row @ u
        angles.append(math.atan2(np.linalg.norm(row - along * u), along))
    return float(np.mean(np.square(angles)))


def test_angular_dispersion_matches_reference_and_orders_clusters():
    rng = np.random.default_rng(8)
    center = rng.normal(size=32)
    tight = center + 0.1 * rng.normal(size=(400, 32))
    loose = center + 1.0 * rng.normal(size=(400, 32))
    d_tight, d_loose = angular_dispersion(tight), angular_dispersion(torch.from_numpy(loose).float())
    assert d_tight == pytest.approx(reference_dispersion(tight), rel=1e-10)
    assert d_loose == pytest.approx(reference_dispersion(loose), rel=1e-6)
    assert 0 < d_tight < d_loose < math.pi**2
    assert angular_dispersion(np.tile(center, (5, 1))) == pytest.approx(0.0, abs=1e-12)
    # antipodal-ish rows exercise the clipping of arccos' argument
    assert angular_dispersion(np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 1e-9]])) == pytest.approx(
        reference_dispersion(np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 1e-9]])), rel=1e-6
    )
    with pytest.raises(ValueError, match="at least 2"):
        angular_dispersion(np.ones((1, 4)))
