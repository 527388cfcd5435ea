"""DreamBooth on a WaDi teacher with any adapter kind of the registry (``lorad``, ``lora``,
``full``, ...), and the transfer of the learned subject onto the one-step student.

The subject is bound to a rare token by fine-tuning the teacher's UNet on a few instance images,
with prior preservation on renders of the domain (the data the teacher was trained on) so the
rest of the model keeps working. The student gets the subject by applying the same adapter to
its own (merged) UNet: a low-rank adapter is added on the student's weights as it is (LoRaD:
the same rotation of the student's rows; LoRA: the same low-rank delta); full fine-tuning is
transferred as its weight difference (task vector). No second distillation.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from wadi_core.adapters import (adapted_layers, adapter_class, adapter_info, adapter_parameters, adapter_state_dict,
                                add_adapter, load_adapter_state_dict, merge_adapter, remove_adapters, set_adapter)
from wadi_core.domain import caption
from wadi_core.domain.attributes import COLOURS, POSITIONS, SHAPES, SIZES
from wadi_core.domain.data import make_render_set
from wadi_core.downstream import geometry as geo
from wadi_core.downstream.sampling import image_size
from wadi_core.downstream.subjects import render_subject, subject_caption
from wadi_core.downstream.training import encode_renders, eps_loss, snr_weight
from wadi_core.models.teacher import Cond, Teacher

__all__ = ["DreamBoothConfig", "SubjectData", "make_subject_data", "dreambooth_step", "train_dreambooth",
           "apply_subject_adapter", "DEFAULT_INSTANCES", "subject_test_prompts", "subject_scores", "SHAPE_DESCRIPTORS"]

#: (colour, size, position) of the instance images: three colours, both sizes, all positions.
DEFAULT_INSTANCES: tuple[tuple[str, str, str], ...] = (
    ("yellow", "large", "left"), ("yellow", "small", "top"), ("red", "large", "right"),
    ("red", "small", "bottom"), ("green", "large", "top"),
)


@dataclasses.dataclass(frozen=True)
class DreamBoothConfig:
    """One DreamBooth run: subject, token, adapter and the (shared) training budget."""

    kind: str = "lorad"               # adapter kind from wadi_core.adapters (lorad, lora, dora, full)
    rank: int = 8                     # ignored by "full"
    targets: str = "unet_student"     # adapter target preset / regex
    lr: float = 0.0                   # 0: the kind's default (DEFAULT_LR)
    steps: int = 150                  # adapter optimizer steps, each on every instance image
    prior_batch: int = 4              # domain renders per step (prior preservation)
    prior_weight: float = 1.0         # weight of the prior-preservation loss beside the instance loss
    subject: str = "bar"              # a shape of wadi_core.downstream.subjects (the VAE reproduces "bar")
    token: str = "sks"                # rare token that names the subject in the instance captions
    num_instances: int = 5            # instance images: the first n of DEFAULT_INSTANCES (1..5)
    min_snr_gamma: float = 5.0        # Min-SNR-gamma loss weighting (the teacher's own; <= 0: uniform)
    seed: int = 0                     # seed of the prior renders, the noise and the batch draws

    def __post_init__(self) -> None:
        if not 1 <= self.num_instances <= len(DEFAULT_INSTANCES):
            raise ValueError(f"num_instances must be 1..{len(DEFAULT_INSTANCES)}, got {self.num_instances}")
        if self.steps < 0 or self.prior_batch < 0 or self.rank < 1:
            raise ValueError("need steps >= 0, prior_batch >= 0, rank >= 1")

    @property
    def learning_rate(self) -> float:
        return self.lr or DEFAULT_LR.get(self.kind, 1e-4)


#: Learning rates per kind at which each converges in the default budget on the embedded teacher
#: (a rotation angle, a low-rank delta and a full weight need different step sizes).
DEFAULT_LR: dict[str, float] = {"lorad": 1e-2, "lora": 5e-3, "dora": 5e-3, "full": 1e-3}


@dataclasses.dataclass
class SubjectData:
    """Instance images (uint8), their captions, and their VAE latents."""

    images: np.ndarray
    captions: list[str]
    latents: Tensor


def make_subject_data(model: Teacher, cfg: DreamBoothConfig, size: int = 32) -> SubjectData:
    """``cfg.num_instances`` renders of the subject (seeded), captioned with the rare token."""
    specs = DEFAULT_INSTANCES[:cfg.num_instances]
    images = np.stack([render_subject(cfg.subject, c, s, p, seed=10_000 + i, size=size)[0]
                       for i, (c, s, p) in enumerate(specs)])
    captions = [subject_caption(cfg.token, c, s, p) for c, s, p in specs]
    return SubjectData(images, captions, encode_renders(model, images))


def subject_test_prompts(cfg: DreamBoothConfig) -> list[tuple[str, str, str]]:
    """Every (colour, size, position) of the domain that is not an instance image: recontextualisation."""
    seen = set(DEFAULT_INSTANCES[:cfg.num_instances])
    return [(c, s, p) for c in COLOURS for s in SIZES for p in POSITIONS if (c, s, p) not in seen]


def dreambooth_step(model: Teacher, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                    instance_latents: Tensor, instance_cond: Cond, prior_latents: Tensor | None,
                    prior_cond: Cond | None, weights: Tensor, gen: torch.Generator,
                    prior_weight: float = 1.0, grad_clip: float = 1.0) -> dict[str, float]:
    """One DreamBooth update of the active adapter: instance loss + ``prior_weight`` x prior loss
    (Ruiz et al. 2023, eq. 2, with real domain renders as the prior set)."""
    loss_instance = eps_loss(model, instance_latents, instance_cond, weights, gen)
    loss = loss_instance
    loss_prior = torch.zeros(())
    if prior_latents is not None and prior_weight > 0:
        loss_prior = eps_loss(model, prior_latents, prior_cond, weights, gen)  # type: ignore[arg-type]
        loss = loss + prior_weight * loss_prior
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "loss_instance": loss_instance.item(), "loss_prior": loss_prior.item()}


def train_dreambooth(model: Teacher, cfg: DreamBoothConfig, name: str = "subject",
                     log: Callable[[dict[str, float], int], None] | None = None,
                     progress: bool = True) -> dict[str, float]:
    """Add adapter ``name`` (``cfg.kind``) to the teacher's UNet, train it, leave it active.
    Returns a summary (trainable parameters, seconds, last losses)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    size = image_size(model)
    subject = make_subject_data(model, cfg, size)
    instance_cond = model.encode_prompts(subject.captions)
    prior = make_render_set(max(cfg.prior_batch * 32, 1), 50_000 + cfg.seed, "train", size) if cfg.prior_batch else None
    prior_latents = prior_cond_all = None
    if prior is not None:
        prior_latents = encode_renders(model, prior.images)
        prior_cond_all = model.encode_prompts([caption(prior.combos[i]) for i in prior.combo])
    rank = cfg.rank if adapter_class(cfg.kind).uses_rank else 0  # "full" has no rank
    add_adapter(model.denoiser, cfg.kind, name, rank, cfg.targets)
    set_adapter(model.denoiser, name)
    params = adapter_parameters(model.denoiser, name)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    weights = snr_weight(model, cfg.min_snr_gamma)
    model.denoiser.train()
    started = time.time()
    metrics: dict[str, float] = {}
    for step in tqdm(range(cfg.steps), desc=f"dreambooth {cfg.kind}", disable=not progress, mininterval=5):
        pl = pc = None
        if prior_latents is not None:
            idx = torch.randint(len(prior_latents), (cfg.prior_batch,), generator=gen)
            pl, pc = prior_latents[idx], Cond(prior_cond_all.embeds[idx])  # type: ignore[union-attr]
        metrics = dreambooth_step(model, optimizer, params, subject.latents, instance_cond, pl, pc, weights, gen,
                                  cfg.prior_weight)
        if log and step % 25 == 0:
            log({f"dreambooth/{k}": v for k, v in metrics.items()}, step)
    model.denoiser.eval().requires_grad_(False)
    return {"trainable_params": float(sum(p.numel() for p in params)), "train_seconds": time.time() - started,
            **{f"final_{k}": v for k, v in metrics.items()}}


@torch.no_grad()
def apply_subject_adapter(student: Teacher, teacher: Teacher, name: str = "subject") -> None:
    """Put adapter ``name`` of ``teacher``'s UNet onto the student's UNet (same architecture).

    Low-rank kinds: the same adapter (kind, rank, targets, weights) is added to the student and
    merged into its weights. ``full``: each targeted weight moves by (fine-tuned - teacher base).
    """
    info = adapter_info(teacher.denoiser, name)
    if info["kind"] == "full":
        layers = adapted_layers(teacher.denoiser, name)
        for layer_name, layer in layers.items():
            target = student.denoiser.get_submodule(layer_name)
            adapter = layer.adapters[name]
            target.weight += adapter.weight.to(target.weight) - layer.weight.to(target.weight)
            if target.bias is not None and adapter.bias is not None:
                target.bias += adapter.bias.to(target.bias) - layer.bias.to(target.bias)
        return
    add_adapter(student.denoiser, info["kind"], name, info["rank"], info["targets"], **info["options"])
    load_adapter_state_dict(student.denoiser, name, {k: v.clone() for k, v in
                                                      adapter_state_dict(teacher.denoiser, name).items()})
    set_adapter(student.denoiser, name)
    merge_adapter(student.denoiser, name)
    remove_adapters(student.denoiser)
    student.freeze()


#: How a subject's shape is told from the domain's by geometry: (geometry function, +1 if the
#: subject's value is higher than the domain shapes', -1 if lower).
SHAPE_DESCRIPTORS: dict[str, tuple[str, int]] = {"bar": ("elongation", +1), "star": ("solidity", -1)}


@torch.no_grad()
def _mean_features(evaluator: Any, shape: str, spec: tuple[str, str, str], n: int, size: int) -> Tensor:
    imgs = np.stack([render_subject(shape, *spec, seed=900_000 + i, size=size)[0] for i in range(n)])
    feats = evaluator.features(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    return torch.nn.functional.normalize(feats, dim=1).mean(0)


@torch.no_grad()
def subject_scores(images: Tensor, specs: list[tuple[str, str, str]], evaluator: Any, subject: str = "star",
                   n_reference: int = 8) -> dict[str, float]:
    """Subject fidelity and prompt adherence of images generated for ``specs`` (colour, size, position).

    ``fidelity``: cosine of each image's evaluator features to the mean features of ``n_reference``
    held-out renders of the subject with the same colour / size / position; ``class_similarity``:
    the same against the closest domain shape (circle / square / triangle); ``subject_rate``: how
    often the subject is closer than every domain shape. ``shape_rate``: how often the generated
    silhouette has the subject's geometry (``SHAPE_DESCRIPTORS``: a bar's elongation, a star's
    concavity) past the midpoint between the subject's renders and the nearest domain shape's;
    ``descriptor``: the mean of that measurement.
    Adherence (colour, size, position) is read from the pixels with the renderer's geometry.
    """
    size = images.shape[-1]
    feats = torch.nn.functional.normalize(evaluator.features(images), dim=1)
    fid, cls, win = [], [], []
    cache: dict[tuple, Tensor] = {}
    for f, spec in zip(feats, specs):
        ref = {s: cache.setdefault((s, spec), _mean_features(evaluator, s, spec, n_reference, size))
               for s in (subject, *SHAPES)}
        sims = {s: float(f @ torch.nn.functional.normalize(r, dim=0)) for s, r in ref.items()}
        best_class = max(sims[s] for s in SHAPES)
        fid.append(sims[subject])
        cls.append(best_class)
        win.append(sims[subject] > best_class)
    masks = geo.foreground_mask(images)
    colours = geo.object_colour(images, masks)
    # Size threshold: geometric mean of the subject's small and large areas in renders.
    areas = {z: np.mean([render_subject(subject, "red", z, "left", seed=i, size=size)[1].sum() for i in range(8)])
             for z in ("small", "large")}
    threshold = float(np.sqrt(areas["small"] * areas["large"]))
    sizes = ["large" if m.sum() >= threshold else "small" for m in masks]
    positions = [geo.position_of(m) for m in masks]
    if subject not in SHAPE_DESCRIPTORS:
        raise ValueError(f"no geometric descriptor for subject {subject!r}: add one to SHAPE_DESCRIPTORS")
    measure, sign = SHAPE_DESCRIPTORS[subject]
    values = np.array([getattr(geo, measure)(m) for m in masks])

    def on_renders(shape: str) -> float:
        return float(np.mean([getattr(geo, measure)(render_subject(shape, "red", z, "left", seed=i, size=size)[1] > 0.5)
                              for i in range(8) for z in ("small", "large")]))

    nearest = max if sign > 0 else min
    threshold = (on_renders(subject) + nearest(on_renders(s) for s in SHAPES)) / 2
    hits = sign * (np.nan_to_num(values, nan=threshold) - threshold) > 0
    out = {"fidelity": float(np.mean(fid)), "class_similarity": float(np.mean(cls)),
           "subject_rate": float(np.mean(win)), "shape_rate": float(np.mean(hits)),
           "descriptor": float(np.nanmean(values)) if np.isfinite(values).any() else float("nan"),
           "acc_colour": float(np.mean([c == s[0] for c, s in zip(colours, specs)])),
           "acc_size": float(np.mean([z == s[1] for z, s in zip(sizes, specs)])),
           "acc_position": float(np.mean([p == s[2] for p, s in zip(positions, specs)]))}
    out["adherence"] = (out["acc_colour"] + out["acc_size"] + out["acc_position"]) / 3
    return out
