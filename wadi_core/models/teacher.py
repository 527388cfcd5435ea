"""Teacher loading: one interface over SD-family UNets and PixArt-alpha DiTs (diffusers format)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from wadi_core import storage

__all__ = ["Cond", "Teacher", "load_teacher", "resolve_teacher_dir", "EMBEDDED_TEACHER"]

#: The shipped embedded teacher (diffusers StableDiffusionPipeline layout).
EMBEDDED_TEACHER: Path = Path(__file__).resolve().parents[1] / "assets" / "embedded_teacher"

Family = Literal["sd", "pixart"]


@dataclass
class Cond:
    """Text conditioning for a batch: token embeddings ``(B, L, D)`` and, for T5, a ``(B, L)`` mask."""

    embeds: Tensor
    mask: Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        masks = [c.mask for c in conds]
        mask = None if any(m is None for m in masks) else torch.cat(masks)  # type: ignore[arg-type]
        return Cond(torch.cat([c.embeds for c in conds]), mask)

    def where(self, use_other: Tensor, other: "Cond") -> "Cond":
        """Rows where ``use_other`` (bool, (B,)) is true come from ``other`` (e.g. the null prompt)."""
        sel = use_other.view(-1, 1, 1).to(self.embeds.device)
        embeds = torch.where(sel, other.embeds, self.embeds)
        mask = None
        if self.mask is not None and other.mask is not None:
            mask = torch.where(sel[:, :, 0], other.mask, self.mask)
        return Cond(embeds, mask)

    def to(self, device: torch.device | str) -> "Cond":
        return Cond(self.embeds.to(device), None if self.mask is None else self.mask.to(device))

    def detach(self) -> "Cond":
        return Cond(self.embeds.detach(), None if self.mask is None else self.mask.detach())


@dataclass
class Teacher:
    """A frozen text-to-image diffusion teacher: denoiser, VAE, text encoder, tokenizer, scheduler.

    ``predict_eps`` runs the denoiser as it is: whichever adapter is active on ``denoiser``
    (``wadi_core.adapters.set_adapter``) is what answers, so student, fake score and teacher
    share this one module.
    """

    denoiser: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    family: Family
    source: str = ""
    max_text_length: int = 77
    _null: Cond | None = field(default=None, repr=False)

    # -- facts read from the checkpoint configs ------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the denoiser's latent input."""
        cfg = self.denoiser.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), int(h), int(w))

    @property
    def alphas_cumprod(self) -> Tensor:
        """The scheduler's alphabar_t for t = 0..T-1 (float32, CPU)."""
        return self.scheduler.alphas_cumprod.detach().to(torch.float32).cpu()

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # -- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Tokenise and encode prompts as the diffusers pipelines do (CLIP 77 tokens; T5 + mask)."""
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_text_length,
            truncation=True, return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        ids = tok.input_ids.to(device)
        if self.family == "pixart":
            mask = tok.attention_mask.to(device)
            embeds = self.text_encoder(ids, attention_mask=mask)[0]
            return Cond(embeds.to(self.dtype), mask)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tok.attention_mask.to(device)
        embeds = self.text_encoder(ids, attention_mask=mask)[0]
        return Cond(embeds.to(self.dtype), None)

    def null_cond(self, batch: int) -> Cond:
        """The empty prompt's conditioning repeated ``batch`` times (encoded once, cached)."""
        if self._null is None:
            self._null = self.encode_prompts([""])
        e = self._null.embeds.expand(batch, -1, -1)
        m = None if self._null.mask is None else self._null.mask.expand(batch, -1)
        return Cond(e, m)

    # -- denoiser -----------------------------------------------------------------------------
    def predict_eps(self, x_t: Tensor, t: Tensor | int, cond: Cond) -> Tensor:
        """epsilon prediction of the (currently active) denoiser; v-prediction is converted to eps
        in fp32 (so a sampler fed this output must be told ``prediction_type="epsilon"``)."""
        b = x_t.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x_t.device)
        t = t.to(x_t.device).reshape(-1).expand(b) if t.numel() == 1 else t.to(x_t.device)
        if self.family == "pixart":
            out = self.denoiser(
                x_t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
            )[0]
            # Learned-sigma DiTs output (eps, variance): the first latent channels are eps.
            out = out[:, : x_t.shape[1]]
        else:
            out = self.denoiser(x_t, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]
        if self.prediction_type == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t, in fp32
            abar = self.alphas_cumprod.to(x_t.device)[t.long()].view(-1, 1, 1, 1)
            out = abar.sqrt() * out.float() + (1 - abar).sqrt() * x_t.float()
        elif self.prediction_type != "epsilon":
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (epsilon or v_prediction)")
        return out

    # -- images -------------------------------------------------------------------------------
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images, float in [0, 1], (B, 3, H, W)."""
        vae_dtype = next(self.vae.parameters()).dtype
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(vae_dtype) / self.vae_scaling_factor + shift
        img = self.vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> scaled latents (the VAE posterior mean)."""
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode((images * 2 - 1).to(vae_dtype)).latent_dist
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (dist.mean - shift) * self.vae_scaling_factor

    def to(self, device: torch.device | str) -> "Teacher":
        for m in (self.denoiser, self.vae, self.text_encoder):
            m.to(device)
        self._null = None
        return self

    def freeze(self) -> "Teacher":
        for m in (self.denoiser, self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.eval()
        return self


def resolve_teacher_dir(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local diffusers directory for ``uri``: "embedded", a local path, ``s3://`` prefix or hub id."""
    uri = str(uri)
    if uri in ("embedded", "embedded_teacher"):
        if not (EMBEDDED_TEACHER / "model_index.json").exists():
            raise FileNotFoundError(
                f"the embedded teacher is not in {EMBEDDED_TEACHER}: train it with jobs/pretrain_teacher.py "
                "or pass a diffusers directory / s3:// prefix"
            )
        return EMBEDDED_TEACHER
    if storage.is_remote(uri):
        return storage.materialize(uri, cache_dir)
    path = Path(uri).expanduser()
    if path.exists():
        return path
    if uri.count("/") == 1 and not uri.startswith((".", "/", "~")):
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise FileNotFoundError(f"{uri} is not a local path and HF_HUB_OFFLINE is set: pass a local dir or s3://")
        from huggingface_hub import snapshot_download  # network only here, on request

        return Path(snapshot_download(
            uri, cache_dir=cache_dir,
            allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"],
            ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt"],
        ))
    raise FileNotFoundError(f"{uri} is neither a local path, an s3:// prefix nor a hub id (org/name)")


def _component_class(index: dict[str, Any], name: str) -> type:
    import diffusers
    import transformers

    entry = index.get(name)
    if not entry or entry[1] is None:
        raise ValueError(f"model_index.json has no {name!r} component")
    lib, cls = entry
    module = {"diffusers": diffusers, "transformers": transformers}.get(lib)
    if module is None or not hasattr(module, cls):
        raise ValueError(f"component {name!r} has class {lib}.{cls}, which this project cannot load")
    return getattr(module, cls)


def load_teacher(
    uri: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
) -> Teacher:
    """Load a frozen teacher from a diffusers directory (local, ``s3://`` or hub id; "embedded").

    SD-family (``unet`` component) and PixArt-alpha (``transformer``) pipelines are recognised
    from ``model_index.json``; latent shape, VAE scaling and alphabar come from their configs.
    """
    root = resolve_teacher_dir(uri, cache_dir)
    index_file = root / "model_index.json"
    if not index_file.exists():
        raise FileNotFoundError(f"{index_file} is missing: {uri} is not a diffusers pipeline directory")
    index = json.loads(index_file.read_text())
    if "unet" in index:
        family: Family = "sd"
        denoiser = _component_class(index, "unet").from_pretrained(root, subfolder="unet", torch_dtype=dtype)
    elif "transformer" in index:
        family = "pixart"
        denoiser = _component_class(index, "transformer").from_pretrained(
            root, subfolder="transformer", torch_dtype=dtype)
    else:
        raise ValueError(f"{index_file} has neither a 'unet' nor a 'transformer': not an SD or PixArt pipeline")
    vae = _component_class(index, "vae").from_pretrained(root, subfolder="vae", torch_dtype=dtype)
    text_encoder = _component_class(index, "text_encoder").from_pretrained(
        root, subfolder="text_encoder", torch_dtype=dtype)
    tokenizer = _component_class(index, "tokenizer").from_pretrained(root, subfolder="tokenizer")
    scheduler = _component_class(index, "scheduler").from_pretrained(root, subfolder="scheduler")
    if family == "pixart":
        max_len = 120  # PixArt-alpha's T5 context (diffusers' max_sequence_length default)
    else:
        max_len = int(getattr(tokenizer, "model_max_length", 77) or 77)
        max_len = min(max_len, int(text_encoder.config.max_position_embeddings))
    teacher = Teacher(denoiser, vae, text_encoder, tokenizer, scheduler, family, str(uri), max_len)
    return teacher.to(device).freeze()
