"""Streaming Gaussian statistics of features and the Frechet distance between two of them.

Statistics are running float64 sums (n, sum f, sum f f^T), so partial statistics from several
workers merge exactly (``merge`` is a sum) and the covariance uses ``n - 1`` like ``np.cov``
(float32 sums or a 1/n covariance shift FID by 1e-4..1e-3).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from scipy import linalg

__all__ = ["GaussianStats", "frechet_distance", "sqrt_psd"]


def _as_float64(features: Any) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(features, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"features must be 2-D (batch, dim), got shape {arr.shape}")
    return arr


class GaussianStats:
    """Mergeable running mean/covariance of feature vectors, accumulated in float64."""

    def __init__(self, dim: int, metadata: Mapping[str, str] | None = None):
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self.n = 0
        self.sum = np.zeros(self.dim, dtype=np.float64)
        self.sum_outer = np.zeros((self.dim, self.dim), dtype=np.float64)
        # free-form provenance (extractor name, weights sha256, file-list hash, preprocessing)
        self.metadata: dict[str, str] = dict(metadata or {})

    @classmethod
    def from_features(cls, features: Any, metadata: Mapping[str, str] | None = None) -> "GaussianStats":
        arr = _as_float64(features)
        stats = cls(arr.shape[1], metadata)
        stats.update(arr)
        return stats

    def update(self, features: Any) -> "GaussianStats":
        """Add a batch of features ``(B, dim)`` (torch or numpy, any float dtype)."""
        arr = _as_float64(features)
        if arr.shape[1] != self.dim:
            raise ValueError(f"feature dim {arr.shape[1]} does not match the statistics' dim {self.dim}")
        if not np.isfinite(arr).all():
            raise ValueError("features contain NaN or inf: check the extractor input (float images in [0, 1])")
        self.n += arr.shape[0]
        self.sum += arr.sum(axis=0)
        self.sum_outer += arr.T @ arr
        return self

    def merge(self, other: "GaussianStats") -> "GaussianStats":
        """Add another partial statistic in place (exact: the sums add)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dim {other.dim} into dim {self.dim}")
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        for k, v in other.metadata.items():
            self.metadata.setdefault(k, v)
        return self

    def copy(self) -> "GaussianStats":
        out = GaussianStats(self.dim, self.metadata)
        out.n, out.sum, out.sum_outer = self.n, self.sum.copy(), self.sum_outer.copy()
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (``n - 1``, as ``np.cov``), float64."""
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
        mu = self.sum / self.n
        cov = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2

    # ---- serialisation (no pickle) -------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "n": np.array([self.n], dtype=np.int64),
            "sum": self.sum,
            "sum_outer": self.sum_outer,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
                        ) -> "GaussianStats":
        total = np.asarray(state["sum"], dtype=np.float64)
        stats = cls(total.shape[0], metadata)
        stats.n = int(np.asarray(state["n"]).reshape(-1)[0])
        stats.sum = total.copy()
        stats.sum_outer = np.asarray(state["sum_outer"], dtype=np.float64).copy()
        return stats

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``.safetensors`` (metadata in the header) or ``.npz`` (no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            save_file(self.state_dict(), str(path), metadata={k: str(v) for k, v in self.metadata.items()})
        elif path.suffix == ".npz":
            np.savez(path, **self.state_dict(), metadata=np.array(json.dumps(self.metadata)))
        else:
            raise ValueError(f"unknown statistics format {path.suffix!r}: use .safetensors or .npz")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GaussianStats":
        path = Path(path)
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata() or {}
            return cls.from_state_dict(load_file(str(path)), metadata)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                metadata = json.loads(str(z["metadata"])) if "metadata" in z else {}
                return cls.from_state_dict({k: z[k] for k in ("n", "sum", "sum_outer")}, metadata)
        raise ValueError(f"unknown statistics format {path.suffix!r}: use .safetensors or .npz")

    def __repr__(self) -> str:
        return f"GaussianStats(dim={self.dim}, n={self.n})"


def sqrt_psd(mat: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((mat + mat.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _mean_cov(x: Any) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(x, GaussianStats):
        return x.mean_cov()
    mu, cov = x
    return np.asarray(mu, dtype=np.float64), np.asarray(cov, dtype=np.float64)


def frechet_distance(stats_a: Any, stats_b: Any, method: str = "eigh", eps: float = 1e-6) -> float:
    """Frechet distance ``|mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)``.

    ``stats_*`` are :class:`GaussianStats` or ``(mean, cov)`` pairs. ``method="sqrtm"`` is
    clean-fid's (scipy sqrtm; retry with ``eps * I`` on both covariances if not finite; real
    part); ``"eigh"`` the symmetric form ``sum sqrt(eig(R S2 R))``, ``R = sqrt(S1)`` (~10x faster).
    """
    mu1, s1 = _mean_cov(stats_a)
    mu2, s2 = _mean_cov(stats_b)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics have different dims: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    if method == "sqrtm":
        covmean = linalg.sqrtm(s1 @ s2)  # do not pass disp= (deprecated in SciPy 1.16+)
        if not np.isfinite(covmean).all():
            warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonals (clean-fid's retry)")
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
            if imag > 1e-3:
                warnings.warn(f"FID: sqrtm has an imaginary diagonal component of {imag:.3g}; using the real part")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    elif method == "eigh":
        root = sqrt_psd(s1)
        inner = root @ s2 @ root
        ev = np.linalg.eigvalsh((inner + inner.T) / 2)
        tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    else:
        raise ValueError(f"unknown method {method!r}: use 'eigh' or 'sqrtm'")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
