"""Inception-V3 (TF 2015-12-05 port) pool3 features, as clean-fid computes them."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from wadi_core.metrics.protocol import clean_resize, to_uint8
from wadi_core.metrics.weights import resolve_weights

__all__ = ["InceptionExtractor"]


class InceptionExtractor:
    """clean-fid's TorchScript ``inception-2015-12-05.pt`` from a local path or ``s3://``.

    Input images are quantized to uint8 (they come from PNGs), resized per channel with
    :func:`clean_resize` to 299, mapped by ``(x - 128) / 128`` and passed to the TorchScript
    model's ``layers`` (exactly clean-fid's ``InceptionV3W`` path).
    """

    name = "inception_v3_2015_12_05"

    def __init__(self, weights: str | os.PathLike, device: str | torch.device = "cpu",
                 expected_sha256: str | None = None, feature_dim: int = 2048, batch_size: int = 64):
        path, self.sha256 = resolve_weights(weights, "Inception-V3", expected_sha256)
        # TorchScript file the user supplied (clean-fid's release); not a pickle.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; clean-fid ships TorchScript
            model = torch.jit.load(str(path), map_location=device).eval()
        if not hasattr(model, "layers"):
            raise ValueError(f"{weights} is not clean-fid's inception-2015-12-05.pt (no 'layers' submodule)")
        self.layers = model.layers
        self.device = torch.device(device)
        self.feature_dim = feature_dim
        self.batch_size = batch_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """float [0,1] (B,3,H,W) -> float32 (B,3,299,299) in [0, 255] via clean resize."""
        arr = np.stack([clean_resize(im) for im in to_uint8(images)])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            x = self.preprocess(images[start:start + self.batch_size]).to(self.device)
            feats = self.layers((x - 128) / 128).reshape(x.shape[0], -1)
            if feats.shape[1] != self.feature_dim:
                raise ValueError(f"Inception returned {feats.shape[1]} features, expected {self.feature_dim}")
            out.append(feats.float().cpu())
        return torch.cat(out)
