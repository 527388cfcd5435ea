"""Random-weight teachers of the real SD 1.5 / SD 2.1-base / PixArt-alpha architectures.

The component configs live in ``benchmarks/configs/<arch>/`` (as published in the diffusers
checkpoints the recipes name); nothing is downloaded. Two stand-ins, both stated in the
configs: the tokenizers are written here (real vocabulary size, special tokens and max length,
but a character-level vocabulary instead of the real merges), and PixArt's T5 encoder keeps
T5-XXL's width (d_model 4096, d_ff 10240, 64 heads) with 2 of its 24 layers.

``scale`` < 1 shrinks every width (for a quick run before the real one); ``latent`` overrides the
denoiser's sample size (the images are ``8 * latent`` pixels).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from wadi_core.domain.tokenizer import bytes_to_unicode
from wadi_core.models.tiny import tiny_t5_tokenizer

CONFIGS = Path(__file__).resolve().parent / "configs"
#: Architecture -> the paper recipe it rehearses (``recipes/<name>.yaml``).
RECIPES = {"sd15": "sd15", "sd21": "sd21", "pixart": "pixart_alpha_256"}
ARCHS = tuple(RECIPES)
#: Denoiser parameter counts of the published checkpoints (what the configs must reproduce).
REAL_DENOISER_PARAMS = {"sd15": 859_520_964, "sd21": 865_910_724, "pixart": 610_856_096}
CLIP_VOCAB = 49408  # CLIP BPE vocabulary: ... 49406 <|startoftext|>, 49407 <|endoftext|>


def denoiser_name(arch: str) -> str:
    return "transformer" if arch == "pixart" else "unet"


def _read(arch: str, component: str, file: str = "config.json") -> dict[str, Any]:
    path = CONFIGS / arch / component / file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: --arch must be one of {ARCHS}")
    return json.loads(path.read_text())


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def component_configs(arch: str, scale: float = 1.0, latent: int | None = None) -> dict[str, dict[str, Any]]:
    """``{denoiser, text_encoder, vae, scheduler, tokenizer}`` configs, shrunk by ``scale``."""
    cfg = {"denoiser": _read(arch, denoiser_name(arch)), "text_encoder": _read(arch, "text_encoder"),
           "vae": _read(arch, "vae"), "scheduler": _read(arch, "scheduler", "scheduler_config.json"),
           "tokenizer": _read(arch, "tokenizer", "tokenizer_config.json")}
    den, te, vae = cfg["denoiser"], cfg["text_encoder"], cfg["vae"]
    if scale != 1.0:
        vae["block_out_channels"] = [_round(c * scale, 32) for c in vae["block_out_channels"]]
        if arch == "pixart":
            te["d_model"] = _round(te["d_model"] * scale, 64)
            te["num_heads"], te["d_ff"] = te["d_model"] // 64, te["d_model"] * 5 // 2
            den["num_attention_heads"] = max(2, round(den["num_attention_heads"] * scale))
            den["cross_attention_dim"] = den["num_attention_heads"] * den["attention_head_dim"]
            den["caption_channels"] = te["d_model"]
            den["num_layers"] = max(2, round(den["num_layers"] * scale))
        else:
            te["hidden_size"] = _round(te["hidden_size"] * scale, 64)
            te["num_attention_heads"], te["intermediate_size"] = te["hidden_size"] // 64, te["hidden_size"] * 4
            te["num_hidden_layers"] = max(1, round(te["num_hidden_layers"] * scale))
            den["block_out_channels"] = [_round(c * scale, 64) for c in den["block_out_channels"]]
            if isinstance(den["attention_head_dim"], list):  # SD 2.x: head counts, 64-wide heads
                den["attention_head_dim"] = [c // 64 for c in den["block_out_channels"]]
            den["cross_attention_dim"] = te["hidden_size"]
    if latent:
        den["sample_size"] = latent
        vae["sample_size"] = 8 * latent
    return cfg


def _config_only(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def clip_tokenizer(config: dict[str, Any]) -> Any:
    """A CLIPTokenizer with CLIP's 49,408 ids and special tokens but a byte-level vocabulary
    (every byte a token, no merges): real shapes and max length, no download."""
    from transformers import CLIPTokenizer  # noqa: PLC0415 -- transformers: seconds to import

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({f"<|unused{i}|>": i for i in range(len(vocab), CLIP_VOCAB - 2)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = CLIP_VOCAB - 2, CLIP_VOCAB - 1
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=config["model_max_length"],
                                             pad_token=config["pad_token"])


def build_pipeline(arch: str, scale: float = 1.0, latent: int | None = None, seed: int = 0) -> Any:
    """The random-weight diffusers pipeline (fp32, CPU) of ``arch`` from the configs in the repo."""
    import diffusers  # noqa: PLC0415 -- diffusers models: seconds to import
    import transformers  # noqa: PLC0415 -- transformers: seconds to import

    cfg = component_configs(arch, scale, latent)
    torch.manual_seed(seed)
    den_cls = getattr(diffusers, cfg["denoiser"]["_class_name"])
    denoiser = den_cls.from_config(_config_only(cfg["denoiser"]))
    vae = diffusers.AutoencoderKL.from_config(_config_only(cfg["vae"]))
    scheduler = getattr(diffusers, cfg["scheduler"]["_class_name"]).from_config(_config_only(cfg["scheduler"]))
    te_cfg = _config_only(cfg["text_encoder"])
    if arch == "pixart":
        text_encoder = transformers.T5EncoderModel(transformers.T5Config(**te_cfg))
        tokenizer = tiny_t5_tokenizer()  # pad 0, eos 1, unk 2 as T5's; ids < 100 of the 32,128
        tokenizer.model_max_length = cfg["tokenizer"]["model_max_length"]
        return diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                             transformer=denoiser, scheduler=scheduler)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**te_cfg))
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(cfg["tokenizer"]), unet=denoiser,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_teacher(arch: str, out: str | Path, scale: float = 1.0, latent: int | None = None) -> Path:
    """Build and ``save_pretrained`` the teacher to ``out`` (skipped when a complete one with the
    same settings is there: building the real sizes takes a minute and ~5 GB)."""
    out = Path(out)
    stamp = {"arch": arch, "scale": scale, "latent": latent}
    marker = out / "full_size.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    pipe = build_pipeline(arch, scale, latent)
    pipe.save_pretrained(out, safe_serialization=True)
    marker.write_text(json.dumps(stamp))
    return out


def denoiser_on_meta(arch: str) -> torch.nn.Module:
    """The full-size denoiser with parameters on the meta device (no memory)."""
    import diffusers  # noqa: PLC0415 -- diffusers models: seconds to import

    cfg = component_configs(arch)["denoiser"]
    with torch.device("meta"):
        return getattr(diffusers, cfg["_class_name"]).from_config(_config_only(cfg))
