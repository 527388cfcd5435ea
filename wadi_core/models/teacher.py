"""Teacher loading: one interface over SD-family UNets and PixArt-alpha DiTs (diffusers format)."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from wadi_core import storage
from wadi_core.models import sd3, sdxl
from wadi_core.models.flow import eps_from_velocity, flow_alphas_cumprod, flow_from_vp, flow_sigmas_of, is_flow_scheduler

__all__ = ["Cond", "Teacher", "load_teacher", "resolve_teacher_dir", "EMBEDDED_TEACHER", "PromptEncoder",
           "load_prompt_encoder", "encode_text"]

#: The shipped embedded teacher (diffusers StableDiffusionPipeline layout).
EMBEDDED_TEACHER: Path = Path(__file__).resolve().parents[1] / "assets" / "embedded_teacher"

Family = Literal["sd", "pixart", "sdxl", "sd3"]


@dataclass
class Cond:
    """Text conditioning for a batch: token embeddings ``(B, L, D)``, for T5 a ``(B, L)`` mask, and
    for SDXL / SD3 the pooled text embeddings ``(B, P)``."""

    embeds: Tensor
    mask: Tensor | None = None
    pooled: Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        masks = [c.mask for c in conds]
        mask = None if any(m is None for m in masks) else torch.cat(masks)  # type: ignore[arg-type]
        pooled = [c.pooled for c in conds]
        pool = None if any(p is None for p in pooled) else torch.cat(pooled)  # type: ignore[arg-type]
        return Cond(torch.cat([c.embeds for c in conds]), mask, pool)

    def where(self, use_other: Tensor, other: "Cond") -> "Cond":
        """Rows where ``use_other`` (bool, (B,)) is true come from ``other`` (e.g. the null prompt)."""
        sel = use_other.view(-1, 1, 1).to(self.embeds.device)
        embeds = torch.where(sel, other.embeds, self.embeds)
        mask = None
        if self.mask is not None and other.mask is not None:
            mask = torch.where(sel[:, :, 0], other.mask, self.mask)
        pooled = None
        if self.pooled is not None and other.pooled is not None:
            pooled = torch.where(sel[:, :, 0], other.pooled, self.pooled)
        return Cond(embeds, mask, pooled)

    def to(self, device: torch.device | str) -> "Cond":
        return Cond(self.embeds.to(device), None if self.mask is None else self.mask.to(device),
                    None if self.pooled is None else self.pooled.to(device))

    def to_dtype(self, dtype: torch.dtype) -> "Cond":
        """Embeddings (and pooled embeddings) in ``dtype`` (the mask keeps its integer type)."""
        return Cond(self.embeds.to(dtype), self.mask, None if self.pooled is None else self.pooled.to(dtype))

    def detach(self) -> "Cond":
        return Cond(self.embeds.detach(), None if self.mask is None else self.mask.detach(),
                    None if self.pooled is None else self.pooled.detach())

    def rows(self, start: int, stop: int) -> "Cond":
        """Rows ``start:stop`` of every tensor (one prompt's conditioning: ``rows(i, i + 1)``)."""
        return Cond(self.embeds[start:stop], None if self.mask is None else self.mask[start:stop],
                    None if self.pooled is None else self.pooled[start:stop])


@dataclass
class Teacher:
    """A frozen text-to-image diffusion teacher: denoiser, VAE, text encoder, tokenizer, scheduler.

    ``predict_eps`` runs the denoiser as it is: whichever adapter is active on ``denoiser``
    (``wadi_core.adapters.set_adapter``) is what answers, so student, fake score and teacher
    share this one module.
    """

    denoiser: nn.Module
    vae: nn.Module
    text_encoder: nn.Module | None  # None: prompts are encoded elsewhere (``remember`` their Cond)
    tokenizer: Any
    scheduler: Any
    family: Family
    source: str = ""
    max_text_length: int = 77
    root: Path | None = None  # the local diffusers folder it was loaded from
    # How ``encode_train_prompts`` encodes CLIP prompts: "diffusers" (no attention mask, as
    # StableDiffusionPipeline) or "official" (the official training data's mask); see VSDConfig.
    prompt_encoding: str = "diffusers"
    # SDXL's force_zeros_for_empty_prompt: the null prompt (CFG, caption dropout) is all zeros.
    zero_null_prompt: bool = False
    _null: Cond | None = field(default=None, repr=False)
    _known: dict[str, Cond] = field(default_factory=dict, repr=False)

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
        """The scheduler's alphabar_t for t = 0..T-1 (float32, CPU); a flow teacher's is its VP disguise's,
        (1 - s)^2 / ((1 - s)^2 + s^2) on its sigma grid (``wadi_core.models.flow``)."""
        if self.prediction_type == "flow":
            return flow_alphas_cumprod(self.flow_sigmas).to(torch.float32)
        return self.scheduler.alphas_cumprod.detach().to(torch.float32).cpu()

    @property
    def flow_sigmas(self) -> Tensor:
        """A flow teacher's noise level sigma_t for t = 0..T-1 (float64, CPU; ascending, sigma_{T-1} = 1)."""
        return flow_sigmas_of(self.scheduler)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        """"epsilon", "v_prediction", or "flow" (rectified-flow velocity, FlowMatchEulerDiscreteScheduler)."""
        if is_flow_scheduler(self.scheduler):
            return "flow"
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
        """Tokenise and encode prompts as the diffusers pipelines do (CLIP 77 tokens; T5 + mask).
        Without a text encoder, only prompts given to ``remember`` can be answered."""
        if self.text_encoder is not None:
            return encode_text(self.text_encoder, self.tokenizer, self.family, self.max_text_length,
                               prompts).to_dtype(self.dtype)
        missing = [p for p in prompts if p not in self._known]
        if missing:
            raise RuntimeError(f"this teacher was loaded without its text encoder (data.text_encoding=actors), and "
                               f"{len(missing)} prompt(s) were not precomputed (first: {missing[0]!r}): pass their "
                               "embeddings with Teacher.remember, or load it with text_encoder=True")
        return Cond.cat([self._known[p] for p in prompts]).to(self.device).to_dtype(self.dtype)

    @torch.no_grad()
    def encode_train_prompts(self, prompts: list[str]) -> Cond:
        """Training prompts as ``prompt_encoding`` says: "official" runs CLIP with the attention mask
        (the official training data); "diffusers", and every T5 teacher, as ``encode_prompts``. The null
        prompt and sample prompts always go through ``encode_prompts`` (the official code: no mask)."""
        if self.prompt_encoding == "official" and self.family == "sd" and self.text_encoder is not None:
            return encode_text(self.text_encoder, self.tokenizer, self.family, self.max_text_length, prompts,
                               clip_mask=True).to_dtype(self.dtype)
        return self.encode_prompts(prompts)

    def remember(self, prompts: list[str], cond: Cond) -> None:
        """Keep precomputed conditionings (one row per prompt), e.g. the empty prompt and the
        sample prompts of a trainer whose text encoder runs in other processes."""
        for i, p in enumerate(prompts):
            self._known[p] = cond.rows(i, i + 1).to(self.device)
        if "" in self._known:
            self._null = None

    def null_cond(self, batch: int) -> Cond:
        """The empty prompt's conditioning repeated ``batch`` times (encoded once, cached)."""
        if self._null is None:
            null = self.encode_prompts([""])
            self._null = Cond(torch.zeros_like(null.embeds), null.mask,
                              None if null.pooled is None else torch.zeros_like(null.pooled)
                              ) if self.zero_null_prompt else null
        e = self._null.embeds.expand(batch, -1, -1)
        m = None if self._null.mask is None else self._null.mask.expand(batch, -1)
        p = None if self._null.pooled is None else self._null.pooled.expand(batch, -1)
        return Cond(e, m, p)

    # -- denoiser -----------------------------------------------------------------------------
    def predict_eps(self, x_t: Tensor, t: Tensor | int, cond: Cond) -> Tensor:
        """epsilon prediction of the (currently active) denoiser; v-prediction is converted to eps
        in fp32 (so a sampler fed this output must be told ``prediction_type="epsilon"``)."""
        b = x_t.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x_t.device)
        t = t.to(x_t.device).reshape(-1).expand(b) if t.numel() == 1 else t.to(x_t.device)
        if self.prediction_type == "flow":  # a VP model in disguise: x_s = c x_t, eps from the velocity
            return self._flow_eps(x_t, t, cond)
        if self.family == "pixart":
            out = self.denoiser(
                x_t, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=t,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
            )[0]
            # Learned-sigma DiTs output (eps, variance): the first latent channels are eps.
            out = out[:, : x_t.shape[1]]
        elif self.family == "sdxl":
            out = self.denoiser(x_t, t, encoder_hidden_states=cond.embeds, return_dict=False,
                                added_cond_kwargs=sdxl.sdxl_added_cond_kwargs(cond, x_t, self.vae))[0]
        else:
            out = self.denoiser(x_t, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]
        if self.prediction_type == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t, in fp32
            abar = self.alphas_cumprod.to(x_t.device)[t.long()].view(-1, 1, 1, 1)
            out = abar.sqrt() * out.float() + (1 - abar).sqrt() * x_t.float()
        elif self.prediction_type != "epsilon":
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (epsilon or v_prediction)")
        return out

    def predict_velocity(self, x_s: Tensor, timestep: Tensor, cond: Cond) -> Tensor:
        """A flow teacher's raw velocity v = eps - x0 at flow latents ``x_s``, ``timestep`` = sigma * T (float)."""
        if self.family == "sd3":
            return sd3.sd3_velocity(self.denoiser, x_s, timestep, cond)
        return self.denoiser(x_s, timestep, encoder_hidden_states=cond.embeds, return_dict=False)[0]

    def _flow_eps(self, x_vp: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """eps of a flow teacher at VP latents ``x_vp`` and grid indices ``t``, converted in fp32."""
        sigma = self.flow_sigmas.to(torch.float32).to(x_vp.device)[t.long()]
        x_s = flow_from_vp(x_vp, sigma)
        v = self.predict_velocity(x_s.to(x_vp.dtype), sigma * self.num_train_timesteps, cond)
        return eps_from_velocity(x_s, v, sigma)

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
            if m is not None:
                m.to(device)
        self._null = None
        self._known = {p: c.to(device) for p, c in self._known.items()}
        return self

    def freeze(self) -> "Teacher":
        for m in (self.denoiser, self.vae, self.text_encoder):
            if m is not None:
                m.requires_grad_(False)
                m.eval()
        return self


@torch.no_grad()
def encode_text(text_encoder: nn.Module, tokenizer: Any, family: Family, max_length: int,
                prompts: list[str], clip_mask: bool = False) -> Cond:
    """Prompts -> ``Cond`` in the encoder's dtype, as the diffusers pipelines encode them: CLIP at
    77 tokens (SD), T5 with its attention mask at 120 tokens (PixArt-alpha). ``clip_mask`` runs CLIP
    with the tokenizer's attention mask too (the official WaDi training data); the UNet takes no mask,
    so only the padding positions' embeddings change. SDXL: both CLIPs, pooled embeddings, no mask
    (``wadi_core.models.sdxl``; ``clip_mask`` does not apply: the official code has no SDXL data)."""
    if family == "sdxl":
        return sdxl.encode_sdxl_text(text_encoder, tokenizer, max_length, prompts)  # type: ignore[arg-type]
    if family == "sd3":  # CLIP-L + CLIP-G + T5 (max_length: T5's tokens), as StableDiffusion3Pipeline
        return sd3.encode_sd3_prompts(text_encoder, tokenizer, max_length, prompts)  # type: ignore[arg-type]
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids = tok.input_ids.to(device)
    if family == "pixart":
        mask = tok.attention_mask.to(device)
        return Cond(text_encoder(ids, attention_mask=mask)[0], mask)
    use_mask = clip_mask or getattr(text_encoder.config, "use_attention_mask", False)
    mask = tok.attention_mask.to(device) if use_mask else None
    return Cond(text_encoder(ids, attention_mask=mask)[0], None)


@dataclass
class PromptEncoder:
    """A teacher's tokenizer + text encoder alone (Ray Data encoding actors: no denoiser, no VAE)."""

    text_encoder: nn.Module
    tokenizer: Any
    family: Family
    max_length: int

    def __call__(self, prompts: list[str], clip_mask: bool = False) -> Cond:
        """``encode_text`` of ``prompts`` (``clip_mask``: CLIP with the attention mask)."""
        return encode_text(self.text_encoder, self.tokenizer, self.family, self.max_length, prompts,
                           clip_mask=clip_mask)


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
        from huggingface_hub import snapshot_download  # noqa: PLC0415 -- network, only on request

        return Path(snapshot_download(
            uri, cache_dir=cache_dir,
            allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"],
            ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt"],
        ))
    raise FileNotFoundError(f"{uri} is neither a local path, an s3:// prefix nor a hub id (org/name)")


def _component_class(index: dict[str, Any], name: str) -> type:
    import diffusers  # noqa: PLC0415 -- diffusers models: seconds to import
    import transformers  # noqa: PLC0415 -- transformers: seconds to import

    entry = index.get(name)
    if not entry or entry[1] is None:
        raise ValueError(f"model_index.json has no {name!r} component")
    lib, cls = entry
    module = {"diffusers": diffusers, "transformers": transformers}.get(lib)
    if module is None or not hasattr(module, cls):
        raise ValueError(f"component {name!r} has class {lib}.{cls}, which this project cannot load")
    return getattr(module, cls)


def _low_memory_kwargs() -> dict[str, Any]:
    """Build each model on the meta device and fill it from the checkpoint, so a large model is
    held once in RAM while loading instead of twice (random init + weights). Needs accelerate;
    without it the models load the slow way (transformers 5 always loads this way)."""
    return {"low_cpu_mem_usage": True} if importlib.util.find_spec("accelerate") is not None else {}


def _read_index(root: Path, uri: Any) -> dict[str, Any]:
    index_file = root / "model_index.json"
    if not index_file.exists():
        raise FileNotFoundError(f"{index_file} is missing: {uri} is not a diffusers pipeline directory")
    return json.loads(index_file.read_text())


def _family(index: dict[str, Any], where: Any) -> Family:
    if index.get("_class_name") == "StableDiffusionXLPipeline":
        return "sdxl"
    if index.get("_class_name") == "StableDiffusion3Pipeline":
        return "sd3"
    if "unet" in index:
        return "sd"
    if "transformer" in index:
        return "pixart"
    raise ValueError(f"{where} has neither a 'unet' nor a 'transformer': not an SD or PixArt pipeline")


def _text_parts(family: Family) -> tuple[str, ...]:
    """The pipeline folders a prompt encoder of ``family`` needs (text encoders and tokenizers)."""
    if family == "sd3":
        return sd3.TEXT_PARTS
    return sdxl.TEXT_PARTS if family == "sdxl" else ("text_encoder", "tokenizer")


def _text_max_length(family: Family, tokenizer: Any, text_config: Any) -> int:
    if family == "pixart":
        return 120  # PixArt-alpha's T5 context (diffusers' max_sequence_length default)
    if family == "sd3":
        return sd3.SD3_T5_LENGTH  # the T5 part of the joint sequence (CLIP's 77 come from its tokenizer)
    max_len = int(getattr(tokenizer, "model_max_length", 77) or 77)
    return min(max_len, int(text_config.max_position_embeddings))


def load_teacher(
    uri: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    text_encoder: bool = True,
) -> Teacher:
    """Load a frozen teacher from a diffusers directory (local, ``s3://`` or hub id; "embedded").

    SD-family (``unet`` component) and PixArt-alpha (``transformer``) pipelines are recognised
    from ``model_index.json``; latent shape, VAE scaling and alphabar come from their configs.
    ``text_encoder=False`` leaves the text encoder out (its config is still read for the token
    length): prompts are then encoded elsewhere and handed over (``Teacher.remember``).
    """
    root = resolve_teacher_dir(uri, cache_dir)
    index = _read_index(root, uri)
    family = _family(index, root / "model_index.json")
    low_mem = _low_memory_kwargs()
    component = "unet" if family in ("sd", "sdxl") else "transformer"
    denoiser = _component_class(index, component).from_pretrained(root, subfolder=component, torch_dtype=dtype,
                                                                  **low_mem)
    vae = _component_class(index, "vae").from_pretrained(root, subfolder="vae", torch_dtype=dtype, **low_mem)
    encoder_cls = _component_class(index, "text_encoder")
    if family == "sdxl":  # two text encoders and tokenizers, one module: wadi_core.models.sdxl
        parts = {part: root / part for part in sdxl.TEXT_PARTS}
        encoder = (sdxl.load_sdxl_text_encoders(index, parts, dtype, _component_class, **low_mem)
                   if text_encoder else None)
        tokenizer = sdxl.load_sdxl_tokenizers(index, parts, _component_class)
    elif family == "sd3":  # CLIP-L, CLIP-G and T5 as one module: wadi_core.models.sd3
        parts = {part: root / part for part in sd3.TEXT_PARTS}
        encoder = (sd3.load_sd3_text_encoders(index, parts, dtype, _component_class,
                                              int(denoiser.config.joint_attention_dim), **low_mem)
                   if text_encoder else None)
        tokenizer = sd3.load_sd3_tokenizers(index, parts, _component_class)
    else:
        encoder = (encoder_cls.from_pretrained(root, subfolder="text_encoder", torch_dtype=dtype, **low_mem)
                   if text_encoder else None)
        tokenizer = _component_class(index, "tokenizer").from_pretrained(root, subfolder="tokenizer")
    scheduler = _component_class(index, "scheduler").from_pretrained(root, subfolder="scheduler")
    text_config = encoder.config if encoder is not None else encoder_cls.config_class.from_pretrained(
        root / "text_encoder")
    max_len = _text_max_length(family, tokenizer, text_config)
    teacher = Teacher(denoiser, vae, encoder, tokenizer, scheduler, family, str(uri), max_len, root=Path(root),
                      zero_null_prompt=family == "sdxl" and sdxl.zero_null_prompt(index))
    return teacher.to(device).freeze()


def load_prompt_encoder(uri: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu",
                        cache_dir: str | os.PathLike | None = None) -> PromptEncoder:
    """Only the tokenizer and text encoder of a teacher (for an ``s3://`` teacher only those
    folders are downloaded)."""
    uri = str(uri)
    if storage.is_remote(uri):
        index = json.loads(storage.materialize(storage.join(uri, "model_index.json"), cache_dir).read_text())
        family = _family(index, uri)
        local = {part: storage.materialize(storage.join(uri, part), cache_dir) for part in _text_parts(family)}
    else:
        base = resolve_teacher_dir(uri, cache_dir)
        index = _read_index(base, uri)
        family = _family(index, base / "model_index.json")
        local = {part: base / part for part in _text_parts(family)}
    if family == "sdxl":
        encoder = sdxl.load_sdxl_text_encoders(index, local, dtype, _component_class, **_low_memory_kwargs())
        tokenizer = sdxl.load_sdxl_tokenizers(index, local, _component_class)
    elif family == "sd3":
        encoder = sd3.load_sd3_text_encoders(index, local, dtype, _component_class, None, **_low_memory_kwargs())
        tokenizer = sd3.load_sd3_tokenizers(index, local, _component_class)
    else:
        encoder = _component_class(index, "text_encoder").from_pretrained(local["text_encoder"], torch_dtype=dtype,
                                                                          **_low_memory_kwargs())
        tokenizer = _component_class(index, "tokenizer").from_pretrained(local["tokenizer"])
    encoder = encoder.to(device).eval().requires_grad_(False)
    return PromptEncoder(encoder, tokenizer, family, _text_max_length(family, tokenizer, encoder.config))
