"""ReVersion-style relation inversion on a two-object scene teacher.

The embedded teacher draws one object; relations need two. ``finetune_scene_teacher`` adapts it
(UNet + text encoder, from its weights) to captions such as "a red circle above a blue square".
``invert_relation`` then learns a new token <R> from exemplar scenes whose captions leave the
relation word out ("a red circle <R> a blue square"), following ReVersion (Huang et al. 2023):
only the token's input embedding is trained; timesteps are drawn with more weight on high noise
(relation-focal importance sampling, where layout is decided); and a contrastive loss steers <R>
towards the embeddings of preposition words and away from the words of the objects (relation-
steering). The learned embedding is a file that loads into the student's text encoder too, since
the student shares the teacher's text encoder.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from wadi_core.domain.attributes import COLOURS, SHAPES
from wadi_core.domain.teacher import assemble_pipeline
from wadi_core.downstream.geometry import RELATIONS, colour_masks, layout_axis, relation_of
from wadi_core.downstream.sampling import image_size
from wadi_core.downstream.subjects import render_scene, sample_scene, scene_caption
from wadi_core.downstream.training import encode_renders, eps_loss, focal_timesteps, snr_weight
from wadi_core.models.teacher import Cond, Teacher

__all__ = ["SceneTeacherConfig", "finetune_scene_teacher", "RelationConfig", "PREPOSITIONS", "add_token",
           "invert_relation", "save_token", "load_token", "scene_eval_set", "relation_accuracy"]

#: Words that span the "preposition subspace" <R> is steered towards (positives).
PREPOSITIONS: tuple[str, ...] = ("above", "below", "left", "right", "on", "at", "of", "under", "over", "beside",
                                 "top", "bottom")


@dataclasses.dataclass(frozen=True)
class SceneTeacherConfig:
    """Fine-tuning the embedded teacher on two-object scenes (all four relations)."""

    steps: int = 600                  # optimizer steps (cosine lr decay over them, 50 warm-up steps)
    batch_size: int = 64              # scene renders per step
    lr: float = 5e-4                  # peak AdamW learning rate of the UNet and text encoder (weight decay 0.01)
    num_images: int = 8000            # two-object scene renders (all four relations) to draw batches from
    caption_dropout: float = 0.1      # empty prompt for this fraction, so CFG keeps working
    min_snr_gamma: float = 5.0        # Min-SNR-gamma loss weighting (the teacher's own; <= 0: uniform)
    seed: int = 0                     # seed of the scene renders, the noise and the batch draws
    max_minutes: float = 0.0          # > 0: stop training after this long


def _scene_set(n: int, seed: int, size: int, relations: tuple[str, ...] | None = None):
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, relations or RELATIONS) for _ in range(n)]
    images = np.stack([render_scene(s, seed * 1_000_003 + i, size)[0] for i, s in enumerate(scenes)])
    return scenes, images


def finetune_scene_teacher(model: Teacher, cfg: SceneTeacherConfig, out_dir: str | os.PathLike | None = None,
                           log: Callable[[dict[str, float], int], None] | None = None,
                           progress: bool = True) -> dict[str, float]:
    """Train the teacher's UNet and text encoder on scene renders and captions (in place); with
    ``out_dir``, save it as a diffusers pipeline (the scene teacher for distillation and inversion)."""
    size = image_size(model)
    scenes, images = _scene_set(cfg.num_images, cfg.seed + 31, size)
    latents = encode_renders(model, images)
    captions = [scene_caption(s) for s in scenes]
    params = [*model.denoiser.parameters(), *model.text_encoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    model.denoiser.train()
    model.text_encoder.train()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    weights = snr_weight(model, cfg.min_snr_gamma)
    gen = torch.Generator().manual_seed(cfg.seed)
    started, done, loss_ema = time.time(), 0, None
    bar = tqdm(range(cfg.steps), desc="scene teacher", disable=not progress, mininterval=5)
    for step in bar:
        if cfg.max_minutes and time.time() - started > 60 * cfg.max_minutes:
            break
        lr = cfg.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + np.cos(np.pi * step / max(cfg.steps, 1)))
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        cond = _encode_with_grad(model, batch_captions)
        loss = eps_loss(model, latents[idx], cond, weights, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        done += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss_ema:.4f}")
            if log:
                log({"scene_teacher/loss": loss.item()}, step)
    model.freeze()
    model._null = None  # the text encoder changed: re-encode the empty prompt
    if out_dir is not None:
        assemble_pipeline(model.vae, model.text_encoder, model.tokenizer, model.denoiser,
                          model.scheduler).save_pretrained(str(out_dir), safe_serialization=True)
    return {"scene_teacher_steps": float(done),
            "scene_teacher_seconds": time.time() - started, "scene_teacher_loss_ema": float(loss_ema or float("nan"))}


def _encode_with_grad(model: Teacher, prompts: list[str]) -> Cond:
    tok = model.tokenizer(list(prompts), padding="max_length", max_length=model.max_text_length, truncation=True,
                          return_tensors="pt")
    embeds = model.text_encoder(tok.input_ids.to(model.device))[0]
    return Cond(embeds.to(model.dtype))


# ----------------------------------------------------------------------------- relation inversion
@dataclasses.dataclass(frozen=True)
class RelationConfig:
    """Inverting one relation into token ``token`` from ``num_exemplars`` scenes."""

    relation: str = "above"           # exemplar relation: above, below, left of, right of (the job: each of relations)
    token: str = "<R>"                # new token learned in place of the relation word (the job: <R-relation>)
    num_exemplars: int = 10           # exemplar scene renders in `relation`
    steps: int = 300                  # optimizer steps on the token's input embedding
    batch_size: int = 10              # exemplars per step (drawn with replacement)
    lr: float = 5e-3                  # AdamW learning rate of the token's embedding (no weight decay)
    focal_alpha: float = 0.5          # relation-focal timestep sampling (0: uniform)
    steer_weight: float = 0.01        # relation-steering contrastive loss weight (0: off)
    steer_temperature: float = 0.07   # temperature of the steering loss's cosine similarities
    init_word: str = ""               # "" : random init (scaled to the table's mean norm)
    seed: int = 0                     # seed of the exemplars, the random init, the noise and the draws


def add_token(model: Teacher, token: str, init: Tensor | None = None, seed: int = 0) -> int:
    """Add ``token`` to the tokenizer and a row to the text encoder's input embeddings (``init``, or a
    seeded random row of the table's mean norm); returns its id."""
    if token in model.tokenizer.get_vocab():
        raise ValueError(f"token {token!r} is already in the vocabulary; choose another (e.g. '<R2>')")
    model.tokenizer.add_tokens([token])
    emb = model.text_encoder.get_input_embeddings()
    table = emb.weight.data
    noise = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(seed))
    row = init if init is not None else noise * table.norm(dim=1).mean() / table.shape[1] ** 0.5
    model.text_encoder.resize_token_embeddings(len(model.tokenizer))
    token_id = model.tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().weight[token_id] = row.to(table)
    model._null = None
    return int(token_id)


def _word_embedding(model: Teacher, word: str) -> Tensor:
    """Mean input embedding of a word's tokens (domain words are one token, others a few)."""
    ids = model.tokenizer(word, add_special_tokens=False).input_ids
    return model.text_encoder.get_input_embeddings().weight[ids].mean(0)


def invert_relation(model: Teacher, cfg: RelationConfig, log: Callable[[dict[str, float], int], None] | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Learn ``cfg.token`` (added to the model's tokenizer/text encoder) from exemplar scenes in
    ``cfg.relation``; everything else stays frozen. Returns a summary and the exemplars."""
    size = image_size(model)
    scenes, images = _scene_set(cfg.num_exemplars, 4242 + cfg.seed, size, (cfg.relation,))
    latents = encode_renders(model, images)
    captions = [scene_caption(s, relation_word=cfg.token) for s in scenes]  # the relation word never appears
    init = _word_embedding(model, cfg.init_word).detach() if cfg.init_word else None
    token_id = add_token(model, cfg.token, init, seed=cfg.seed)
    emb = model.text_encoder.get_input_embeddings()
    frozen = emb.weight.detach().clone()
    emb.weight.requires_grad_(True)
    positives = torch.stack([_word_embedding(model, w) for w in PREPOSITIONS]).detach()
    negatives = torch.stack([_word_embedding(model, w) for w in (*COLOURS, *SHAPES, "a")]).detach()
    optimizer = torch.optim.AdamW([emb.weight], lr=cfg.lr, weight_decay=0.0)
    weights = torch.ones(model.num_train_timesteps)  # the focal sampling already reweights t
    gen = torch.Generator().manual_seed(cfg.seed)
    started, metrics = time.time(), {}
    for step in tqdm(range(cfg.steps), desc=f"invert {cfg.relation!r}", disable=not progress, mininterval=5):
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        cond = _encode_with_grad(model, [captions[i] for i in idx.tolist()])
        t = focal_timesteps(cfg.batch_size, model.num_train_timesteps, cfg.focal_alpha, gen)
        loss_denoise = eps_loss(model, latents[idx], cond, weights, gen, t)
        loss = loss_denoise
        loss_steer = torch.zeros(())
        if cfg.steer_weight > 0:
            # InfoNCE over cosine similarities: every preposition is a positive for <R>, the
            # object words are negatives (ReVersion's relation-steering contrastive learning).
            r = F.normalize(emb.weight[token_id], dim=0)
            pos = F.normalize(positives, dim=1) @ r / cfg.steer_temperature
            neg = F.normalize(negatives, dim=1) @ r / cfg.steer_temperature
            loss_steer = -(pos - torch.logsumexp(torch.cat([pos, neg]), 0)).mean()
            loss = loss + cfg.steer_weight * loss_steer
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            keep = torch.ones(emb.weight.shape[0], dtype=torch.bool)
            keep[token_id] = False
            emb.weight.grad[keep] = 0  # only the new token learns
        optimizer.step()
        with torch.no_grad():
            emb.weight[keep] = frozen[keep]  # undo AdamW's moment drift on the frozen rows
        metrics = {"loss": loss.item(), "loss_denoise": loss_denoise.item(), "loss_steer": loss_steer.item()}
        if log and step % 25 == 0:
            log({f"reversion/{k}": v for k, v in metrics.items()}, step)
    emb.weight.requires_grad_(False)
    model.freeze()
    model._null = None
    vec = emb.weight[token_id].detach()
    words = F.normalize(torch.stack([_word_embedding(model, w) for w in PREPOSITIONS]), dim=1)
    nearest = words @ F.normalize(vec, dim=0)
    return {"train_seconds": time.time() - started, **{f"final_{k}": v for k, v in metrics.items()},
            "nearest_preposition": PREPOSITIONS[int(nearest.argmax())], "exemplar_captions": captions,
            "exemplars": images}


def save_token(model: Teacher, token: str, path: str | os.PathLike, relation: str = "") -> None:
    """The learned token's embedding as safetensors (token and relation in the metadata)."""
    token_id = model.tokenizer.convert_tokens_to_ids(token)
    vec = model.text_encoder.get_input_embeddings().weight[token_id].detach().cpu().contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"embedding": vec}, str(path), metadata={"format": "wadi-token-v1", "token": token,
                                                       "relation": relation})


def load_token(model: Teacher, path: str | os.PathLike) -> str:
    """Add a token saved by ``save_token`` to ``model`` (e.g. the one-step student); returns the token."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "wadi-token-v1":
            raise ValueError(f"{path} is not a learned-token file (metadata format={meta.get('format')!r})")
        vec = f.get_tensor("embedding")
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    if vec.shape != (width,):
        raise ValueError(f"{path} holds a {tuple(vec.shape)} embedding; this text encoder needs ({width},)")
    add_token(model, meta["token"], vec)
    model.freeze()
    return meta["token"]


def scene_eval_set(n: int, relation: str, seed: int = 99):
    """``n`` new object pairs in ``relation`` (scenes), for generating with the token or the word."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, (relation,)) for _ in range(n)]


def relation_accuracy(images: Tensor, scenes: list) -> dict[str, float]:
    """``relation_accuracy``: fraction of images whose two objects, found by their colours, stand in
    the scene's relation; ``both_found``: how often both colours were there at all;
    ``axis_accuracy``: how often the two largest objects, whatever their colours, are arranged
    along the relation's axis (vertical for above/below), which separates layout from colour binding."""
    found, correct, axis = [], [], []
    for img, s in zip(images, scenes):
        a, b = colour_masks(img, [s.colour_a, s.colour_b])
        rel = relation_of(a, b)
        found.append(rel is not None)
        correct.append(rel == s.relation)
        axis.append(layout_axis(img) == ("vertical" if s.relation in ("above", "below") else "horizontal"))
    return {"relation_accuracy": float(np.mean(correct)), "both_found": float(np.mean(found)),
            "axis_accuracy": float(np.mean(axis))}
