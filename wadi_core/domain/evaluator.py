"""The domain evaluator: a small CNN giving FID features and per-attribute predictions.

It implements both evaluation protocols of ``wadi_core.metrics``: ``FeatureExtractor``
(``features(images) -> (B, 128)``, for a domain FID) and ``PromptScorer`` (``score(images,
prompts) -> (B,)``: the fraction of the attributes a caption names that the image shows, the
domain's stand-in for CLIP score). Images are float [0, 1], (B, 3, H, W), any size.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from wadi_core.domain.attributes import ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, Attributes, find_attributes
from wadi_core.domain.data import make_render_set

__all__ = ["EvaluatorConfig", "DomainEvaluator", "load_domain_evaluator", "train_domain_evaluator",
           "DEFAULT_EVALUATOR_DIR", "render_accuracy"]

DEFAULT_EVALUATOR_DIR = Path(__file__).resolve().parents[1] / "assets" / "domain_evaluator"


@dataclasses.dataclass(frozen=True)
class EvaluatorConfig:
    image_size: int = 32
    channels: tuple[int, ...] = (32, 64, 64)
    feature_dim: int = 128


class DomainEvaluator(nn.Module):
    """CNN over 32x32 renders: penultimate features + one classification head per attribute."""

    name = "domain"

    def __init__(self, cfg: EvaluatorConfig = EvaluatorConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.channels[0], 3, padding=1), nn.GroupNorm(8, cfg.channels[0]), nn.SiLU()]
        c = cfg.channels[0]
        for c_out in cfg.channels:
            # Each stage halves the resolution: 32 -> 16 -> 8 -> 4.
            layers += [nn.Conv2d(c, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
            c = c_out
        self.body = nn.Sequential(*layers)
        spatial = cfg.image_size // 2 ** len(cfg.channels)
        # Flatten, not global pooling: the position attribute needs where the object is.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c * spatial * spatial, cfg.feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({n: nn.Linear(cfg.feature_dim, len(ATTRIBUTE_VALUES[n])) for n in ATTRIBUTE_NAMES})

    @property
    def feature_dim(self) -> int:
        return self.cfg.feature_dim

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            x = F.interpolate(x, size=(self.cfg.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images float [0,1] -> (features (B, D), {attribute: logits})."""
        feats = self.embed(self.body(self._prepare(images)))
        return feats, {n: head(feats) for n, head in self.heads.items()}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """FID features (B, feature_dim) of float [0,1] images (B,3,H,W)."""
        return self(images.to(self._device()))[0].float().cpu()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[Attributes]:
        """The most likely attributes of each image."""
        _, logits = self(images.to(self._device()))
        idx = {n: logits[n].argmax(1).tolist() for n in ATTRIBUTE_NAMES}
        return [Attributes(**{n: ATTRIBUTE_VALUES[n][idx[n][i]] for n in ATTRIBUTE_NAMES}) for i in range(len(images))]

    @torch.no_grad()
    def attribute_matches(self, images: torch.Tensor, prompts: list[str]) -> list[dict[str, bool]]:
        """Per image, for each attribute the prompt names: does the image show it?"""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        preds = self.predict(images)
        out = []
        for pred, prompt in zip(preds, prompts):
            wanted = find_attributes(prompt)
            if not wanted:
                raise ValueError(f"prompt {prompt!r} names no domain attribute; the domain evaluator only "
                                 "scores domain captions (see wadi_core.domain.caption)")
            out.append({n: getattr(pred, n) == v for n, v in wanted.items()})
        return out

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Prompt alignment (B,): fraction of the caption's attributes that the image shows."""
        return torch.tensor([float(np.mean(list(m.values()))) for m in self.attribute_matches(images, prompts)])

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / "model.safetensors"))
        cfg = dataclasses.asdict(self.cfg) | {"attributes": {n: list(ATTRIBUTE_VALUES[n]) for n in ATTRIBUTE_NAMES}}
        (out / "config.json").write_text(json.dumps(cfg, indent=1))


def load_domain_evaluator(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> DomainEvaluator:
    """Load the shipped evaluator (or one saved with ``DomainEvaluator.save`` at ``path``), in eval mode."""
    d = Path(path or DEFAULT_EVALUATOR_DIR)
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"no domain evaluator in {d}: train one with `python jobs/train_domain_evaluator.py`")
    raw = json.loads((d / "config.json").read_text())
    saved_values = raw.pop("attributes", None)
    if saved_values is not None and saved_values != {n: list(ATTRIBUTE_VALUES[n]) for n in ATTRIBUTE_NAMES}:
        raise ValueError(f"evaluator in {d} was trained for other attribute values; retrain it")
    cfg = EvaluatorConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    model = DomainEvaluator(cfg)
    model.load_state_dict(load_file(str(d / "model.safetensors")))
    return model.eval().requires_grad_(False).to(device)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur and noise of random strength, so generated (slightly soft) images classify well."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=gen) * 1.2
    k = torch.arange(-2, 3, dtype=torch.float32)
    kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (B, 5)
    blur = sigma > 0.3
    xb = x.clone()
    if blur.any():
        xs = x[blur]
        ks = kern[blur]
        n = xs.shape[0]
        xs = xs.reshape(1, n * 3, *xs.shape[-2:])
        kx = ks.repeat_interleave(3, 0)[:, None, None, :]
        ky = ks.repeat_interleave(3, 0)[:, None, :, None]
        xs = F.conv2d(F.pad(xs, (2, 2, 0, 0), mode="replicate"), kx, groups=n * 3)
        xs = F.conv2d(F.pad(xs, (0, 0, 2, 2), mode="replicate"), ky, groups=n * 3)
        xb[blur] = xs.reshape(n, 3, *x.shape[-2:])
    noise = torch.randn(x.shape, generator=gen) * (torch.rand(b, 1, 1, 1, generator=gen) * 0.06)
    return (xb + noise).clamp(0, 1)


def train_domain_evaluator(
    steps: int = 1500, batch: int = 128, lr: float = 2e-3, seed: int = 0,
    cfg: EvaluatorConfig = EvaluatorConfig(), log: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
) -> DomainEvaluator:
    """Train on fresh renders of all 144 combinations each step (blur/noise augmented)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DomainEvaluator(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="evaluator", disable=not progress, mininterval=5)
    for step in bar:
        data = make_render_set(batch, seed * 1_000_003 + step + 1, "all", cfg.image_size)
        x = _augment(torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255, gen)
        target = torch.tensor([data.combos[i].index() for i in data.combo])
        _, logits = model(x)
        losses = [F.cross_entropy(logits[n], target[:, j]) for j, n in enumerate(ATTRIBUTE_NAMES)]
        loss = sum(losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            acc = {f"acc/{n}": (logits[n].argmax(1) == target[:, j]).float().mean().item()
                   for j, n in enumerate(ATTRIBUTE_NAMES)}
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if log:
                log({"loss": loss.item(), **acc}, step)
    return model.eval().requires_grad_(False)


def render_accuracy(model: DomainEvaluator, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` fresh clean renders (all combinations)."""
    data = make_render_set(n, seed, "all", model.cfg.image_size)
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    preds = model.predict(x)
    truth = [data.combos[i] for i in data.combo]
    return {n_: float(np.mean([getattr(p, n_) == getattr(t, n_) for p, t in zip(preds, truth)])) for n_ in ATTRIBUTE_NAMES}
