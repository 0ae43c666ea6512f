"""PHI-S normalization of teacher features and angular dispersion of summaries.

PHI-S (RADIO / FeatSharp): ``y = alpha * H @ V.T @ (x - mean)`` with ``C = V diag(lam) V.T`` the teacher's
feature covariance, ``alpha = 1 / sqrt(mean(lam))`` and ``H`` a normalized Hadamard matrix. Because every
entry of ``H`` is ``+-1/sqrt(n)``, each output dimension has variance exactly ``alpha**2 * mean(lam) = 1``:
the energy that PCA would pack into a few dimensions is spread evenly, which keeps one loss weight right
for every channel and suits fp16/int8 storage. It is a rotation plus one scale, not whitening.

Moments are accumulated in float64 and merged (Chan et al.) so that workers can each summarize their own
batches; fitting is a cheap reduction over the merged moments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


# -- moments ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Moments:
    """Mergeable float64 count / mean / centered second moment (``m2 = sum (x-mean)(x-mean)^T``)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def __post_init__(self) -> None:
        self.count = int(self.count)
        self.mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        self.m2 = np.asarray(self.m2, dtype=np.float64)
        c = self.mean.shape[0]
        if self.count < 0:
            raise ValueError(f"Moments.count must be >= 0, got {self.count}")
        if self.m2.shape != (c, c):
            raise ValueError(f"Moments.m2 must have shape ({c}, {c}) to match mean, got {self.m2.shape}")

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def empty(cls, dim: int) -> Moments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_features(cls, x: ArrayLike) -> Moments:
        """Moments of ``x [..., C]`` (leading dims flattened); torch input is reduced on its own device."""
        if isinstance(x, torch.Tensor):
            if x.ndim == 0:
                raise ValueError("features must have at least one dimension [..., C]")
            t = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            if t.shape[0] == 0:
                return cls.empty(t.shape[1])
            mean = t.mean(dim=0)
            tc = t - mean
            return cls(t.shape[0], mean.cpu().numpy(), (tc.T @ tc).cpu().numpy())
        a = np.asarray(x, dtype=np.float64)
        if a.ndim == 0:
            raise ValueError("features must have at least one dimension [..., C]")
        a = a.reshape(-1, a.shape[-1])
        if a.shape[0] == 0:
            return cls.empty(a.shape[1])
        mean = a.mean(axis=0)
        ac = a - mean
        return cls(a.shape[0], mean, ac.T @ ac)

    def merge(self, other: Moments) -> Moments:
        """Parallel combination (Chan et al.): order-independent up to rounding; returns a new object."""
        if self.dim != other.dim:
            raise ValueError(f"cannot merge Moments of dim {self.dim} with Moments of dim {other.dim}")
        if other.count == 0:
            return Moments(self.count, self.mean.copy(), self.m2.copy())
        if self.count == 0:
            return Moments(other.count, other.mean.copy(), other.m2.copy())
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / n)
        return Moments(n, mean, m2)

    def covariance(self) -> np.ndarray:
        """Population covariance ``m2 / count`` (PHI-S fits on many samples, so n vs n-1 is moot)."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 feature vectors, have {self.count}")
        cov = self.m2 / self.count
        return (cov + cov.T) / 2.0

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"count": np.array([self.count], dtype=np.int64), "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_arrays(cls, d: dict[str, Any]) -> Moments:
        return cls(int(np.asarray(d["count"]).reshape(-1)[0]), d["mean"], d["m2"])


# -- rotations ----------------------------------------------------------------------------------------------
def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % f for f in range(3, math.isqrt(q) + 1, 2))


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = chi(j - i)`` with ``chi`` the quadratic character mod prime ``q``."""
    chi = -np.ones(q, dtype=np.int8)
    chi[0] = 0
    chi[[(k * k) % q for k in range(1, q)]] = 1
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int) -> np.ndarray | None:
    """Unnormalized ±1 Hadamard matrix of order ``m`` from Paley I (m=q+1) or II (m=2(q+1)), else None."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:
        s = np.zeros((m, m), dtype=np.int8)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return s + np.eye(m, dtype=np.int8)
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:
        s = np.zeros((q + 1, q + 1), dtype=np.int8)
        s[0, 1:] = 1
        s[1:, 0] = 1
        s[1:, 1:] = _jacobsthal(q)
        plus = np.array([[1, 1], [1, -1]], dtype=np.int8)
        zero = np.array([[1, -1], [-1, -1]], dtype=np.int8)
        return np.kron(s, plus) + np.kron(np.eye(q + 1, dtype=np.int8), zero)
    return None


def hadamard_matrix(n: int) -> np.ndarray | None:
    """Normalized Hadamard matrix (float64, ``H @ H.T = I``, entries ``±1/sqrt(n)``) or None.

    Orders covered: ``2**k * m`` with ``m = 1`` (Sylvester) or ``m`` a Paley I/II order (Sylvester ⊗ Paley).
    """
    if n < 1:
        raise ValueError(f"Hadamard order must be >= 1, got {n}")
    k = (n & -n).bit_length() - 1  # largest power of two dividing n
    for j in range(k, -1, -1):  # smallest core first: cheaper, and pure Sylvester when possible
        m = n >> j
        core = np.ones((1, 1), dtype=np.int8) if m == 1 else _paley(m)
        if core is None:
            continue
        h = core
        for _ in range(j):
            h = np.block([[h, h], [h, -h]])
        return h.astype(np.float64) / math.sqrt(n)
    return None


def orthogonal_fallback(n: int, seed: int = 0) -> np.ndarray:
    """Deterministic orthogonal matrix: QR of a seeded random ±1 matrix, signs fixed so ``diag(R) > 0``."""
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, size=(n, n)).astype(np.float64) * 2.0 - 1.0
    q, r = np.linalg.qr(signs)
    d = np.sign(np.diag(r))
    d[d == 0] = 1.0
    return q * d[None, :]


# -- PHI-S --------------------------------------------------------------------------------------------------
_KINDS = ("hadamard", "orthogonal")


@dataclass(frozen=True, eq=False)
class PhiS:
    """Fitted PHI-S transform. Treated as immutable: derived weights are cached on first use."""

    mean: np.ndarray
    eigvecs: np.ndarray
    eigvals: np.ndarray
    rotation: np.ndarray
    alpha: float
    rotation_kind: str
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, np.ascontiguousarray(value, dtype=np.float64))

        for name in ("mean", "eigvecs", "eigvals", "rotation"):
            fix(name, getattr(self, name))
        object.__setattr__(self, "alpha", float(self.alpha))
        c = self.mean.shape[0]
        if self.mean.shape != (c,) or self.eigvals.shape != (c,):
            raise ValueError(f"PhiS mean/eigvals must be [C]; got {self.mean.shape} and {self.eigvals.shape}")
        if self.eigvecs.shape != (c, c) or self.rotation.shape != (c, c):
            raise ValueError(
                f"PhiS eigvecs/rotation must be [{c}, {c}]; got "
                f"{self.eigvecs.shape} and {self.rotation.shape}"
            )
        if self.rotation_kind not in _KINDS:
            raise ValueError(f"rotation_kind must be one of {_KINDS}, got {self.rotation_kind!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be finite and > 0, got {self.alpha}")

    # Cached tensors (possibly on a GPU) must not travel with the object to other Ray workers.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def _cached(self, key: Any, make: Any) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    @property
    def weight(self) -> np.ndarray:
        """``W = alpha * H @ V.T`` so that ``y = W @ (x - mean)``."""
        return self._cached("W", lambda: self.alpha * (self.rotation @ self.eigvecs.T))

    @property
    def inverse_weight(self) -> np.ndarray:
        """``V @ H.T / alpha`` (exact inverse of ``weight`` because V and H are orthogonal)."""
        return self._cached("Winv", lambda: (self.eigvecs @ self.rotation.T) / self.alpha)

    def _torch_params(self, device: torch.device, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (matrix, mean) on ``device``, built once per device: forward runs once per batch."""

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            # torch.tensor copies, so arrays that Ray hands over read-only (zero-copy) are fine.
            w = self.inverse_weight if inverse else self.weight
            return (
                torch.tensor(w, dtype=torch.float32, device=device),
                torch.tensor(self.mean, dtype=torch.float32, device=device),
            )

        return self._cached(("torch", inverse, str(device)), make)

    def _check_dim(self, x: ArrayLike, what: str) -> None:
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"PhiS.{what} expects [..., {self.dim}] features, got shape {tuple(x.shape)}")

    def forward(self, x: ArrayLike) -> ArrayLike:
        """Teacher space -> PHI-S space. numpy -> float64 numpy; torch -> float32 torch on x's device."""
        self._check_dim(x, "forward")
        if isinstance(x, torch.Tensor):
            w, mu = self._torch_params(x.device, inverse=False)
            return (x.to(torch.float32) - mu) @ w.T
        return (np.asarray(x, dtype=np.float64) - self.mean) @ self.weight.T

    def inverse(self, y: ArrayLike) -> ArrayLike:
        """PHI-S space -> teacher space, same dtype conventions as ``forward``."""
        self._check_dim(y, "inverse")
        if isinstance(y, torch.Tensor):
            winv, mu = self._torch_params(y.device, inverse=True)
            return y.to(torch.float32) @ winv.T + mu
        return np.asarray(y, dtype=np.float64) @ self.inverse_weight.T + self.mean

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain float64/uint8 arrays (safetensors-friendly); the kind string is stored as its UTF-8 bytes."""
        return {
            "mean": self.mean,
            "eigvecs": self.eigvecs,
            "eigvals": self.eigvals,
            "rotation": self.rotation,
            "alpha": np.array([self.alpha], dtype=np.float64),
            "rotation_kind": np.frombuffer(self.rotation_kind.encode(), dtype=np.uint8).copy(),
        }

    @classmethod
    def from_arrays(cls, d: dict[str, Any]) -> PhiS:
        missing = {"mean", "eigvecs", "eigvals", "rotation", "alpha", "rotation_kind"} - set(d)
        if missing:
            raise ValueError(f"PHI-S arrays lack {sorted(missing)}")
        kind = np.asarray(d["rotation_kind"], dtype=np.uint8).tobytes().decode()
        alpha = float(np.asarray(d["alpha"]).reshape(-1)[0])
        return cls(d["mean"], d["eigvecs"], d["eigvals"], d["rotation"], alpha, kind)

    def save(self, path: str) -> None:
        from safetensors.numpy import save_file

        save_file(self.to_arrays(), str(path), metadata={"format": "radio-dist-phis/1"})

    @classmethod
    def load(cls, path: str) -> PhiS:
        from safetensors.numpy import load_file

        return cls.from_arrays(load_file(str(path)))


def fit_phis(m: Moments, seed: int = 0) -> PhiS:
    """Fit PHI-S from merged moments; eigenvalues descending, each eigenvector with a deterministic sign."""
    cov = m.covariance()
    lam, v = np.linalg.eigh(cov)
    lam, v = np.clip(lam[::-1], 0.0, None), v[:, ::-1]
    # eigh's eigenvector signs are arbitrary; make the largest-magnitude entry of each one positive.
    pivot = v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])]
    v = v * np.where(pivot < 0, -1.0, 1.0)[None, :]
    scale = max(1.0, float(np.max(np.abs(m.mean))))
    if float(lam.mean()) <= (64 * np.finfo(np.float64).eps * scale) ** 2:
        raise ValueError(
            f"cannot fit PHI-S: features are constant (total variance {float(lam.sum()):.3g} "
            f"over {m.count} vectors of dim {m.dim})"
        )
    h = hadamard_matrix(m.dim)
    kind = "hadamard"
    if h is None:
        h, kind = orthogonal_fallback(m.dim, seed), "orthogonal"
    return PhiS(m.mean.copy(), v, lam, h, 1.0 / math.sqrt(float(lam.mean())), kind)


# -- summaries ----------------------------------------------------------------------------------------------
def angular_dispersion(summaries: ArrayLike) -> float:
    """``Disp = E[arccos(cos(y, mu_y))**2]``: the scale of the balanced summary loss ``Theta**2 / Disp``."""
    if isinstance(summaries, torch.Tensor):
        summaries = summaries.detach().to(device="cpu", dtype=torch.float64).numpy()
    y = np.asarray(summaries, dtype=np.float64)
    if y.ndim == 0:
        raise ValueError("summaries must be [N, C]")
    y = y.reshape(-1, y.shape[-1]) if y.ndim > 1 else y.reshape(-1, 1)
    if y.shape[0] < 2:
        raise ValueError(f"angular dispersion needs at least 2 summaries, got {y.shape[0]}")
    mu = y.mean(axis=0)
    mu_norm = float(np.linalg.norm(mu))
    if mu_norm == 0.0:
        raise ValueError("angular dispersion is undefined: the mean summary vector is zero")
    norms = np.linalg.norm(y, axis=1)
    cos = np.divide(y @ (mu / mu_norm), norms, out=np.zeros_like(norms), where=norms > 0)
    return float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0)) ** 2))
