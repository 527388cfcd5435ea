"""Random-weight teachers of the real SD 1.5 / SD 2.1-base / PixArt-alpha / SDXL base 1.0 /
SD3-medium architectures.

The component configs live in ``benchmarks/configs/<arch>/`` (as published in the diffusers
checkpoints the recipes name); nothing is downloaded. Two stand-ins, both stated in the
configs: the tokenizers are written here (real vocabulary size, special tokens and max length,
but a character-level vocabulary instead of the real merges), and the T5-v1.1-XXL encoder of
PixArt and of SD3 (``text_encoder_3``) keeps T5-XXL's width (d_model 4096, d_ff 10240, 64 heads)
with 2 of its 24 layers (518 M of 4.76 B parameters). SDXL's CLIP-L and OpenCLIP bigG and SD3's
CLIP-L and CLIP-G are their real sizes.

``scale`` < 1 shrinks every width (for a quick run before the real one); ``latent`` overrides the
denoiser's sample size (the images are ``8 * latent`` pixels); ``depth`` cuts only the denoiser's
deep stack (SDXL: the 10 transformer layers of each 1280-wide block; SD3 / PixArt: the transformer
blocks), every width and every other component left real: the same kind of stand-in as the T5's,
for a denoiser whose fp32 copies two workers and an export cannot hold in 24 GiB.
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
RECIPES = {"sd15": "sd15", "sd21": "sd21", "pixart": "pixart_alpha_256", "sdxl": "sdxl", "sd3": "sd3_medium"}
ARCHS = tuple(RECIPES)
#: Denoiser parameter counts of the published checkpoints (what the configs must reproduce).
REAL_DENOISER_PARAMS = {"sd15": 859_520_964, "sd21": 865_910_724, "pixart": 610_856_096,
                        "sdxl": 2_567_463_684, "sd3": 2_028_328_000}
#: The teacher family ``wadi_core.models.load_teacher`` must recognise in each written folder.
FAMILIES = {"sd15": "sd", "sd21": "sd", "pixart": "pixart", "sdxl": "sdxl", "sd3": "sd3"}
#: Text encoder folders of each pipeline, in the order the pipeline names them.
TEXT_ENCODERS = {"sd15": ("text_encoder",), "sd21": ("text_encoder",), "pixart": ("text_encoder",),
                 "sdxl": ("text_encoder", "text_encoder_2"),
                 "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3")}
CLIP_VOCAB = 49408  # CLIP BPE vocabulary: ... 49406 <|startoftext|>, 49407 <|endoftext|>


def denoiser_name(arch: str) -> str:
    return "transformer" if arch in ("pixart", "sd3") else "unet"


def tokenizer_name(encoder: str) -> str:
    """``text_encoder_2`` -> ``tokenizer_2``: the tokenizer folder that goes with an encoder folder."""
    return encoder.replace("text_encoder", "tokenizer")


def _read(arch: str, component: str, file: str = "config.json") -> dict[str, Any]:
    path = CONFIGS / arch / component / file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: --arch must be one of {ARCHS}")
    return json.loads(path.read_text())


def _round(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def component_configs(arch: str, scale: float = 1.0, latent: int | None = None,
                      depth: int | None = None) -> dict[str, dict[str, Any]]:
    """``{denoiser, vae, scheduler, text_encoder[_2, _3], tokenizer[_2, _3]}`` configs, shrunk by ``scale``,
    the denoiser's deep stack cut to ``depth`` layers."""
    cfg = {"denoiser": _read(arch, denoiser_name(arch)), "vae": _read(arch, "vae"),
           "scheduler": _read(arch, "scheduler", "scheduler_config.json")}
    for enc in TEXT_ENCODERS[arch]:
        cfg[enc] = _read(arch, enc)
        cfg[tokenizer_name(enc)] = _read(arch, tokenizer_name(enc), "tokenizer_config.json")
    if scale != 1.0:
        _shrink(arch, cfg, scale)
    if depth:
        _cut_depth(arch, cfg["denoiser"], depth)
    if latent:
        cfg["denoiser"]["sample_size"] = latent
        cfg["vae"]["sample_size"] = 8 * latent
    return cfg


def _cut_depth(arch: str, den: dict[str, Any], depth: int) -> None:
    """The denoiser's deepest stack cut to ``depth`` layers (SDXL: transformer layers per 1280-wide block,
    the mid block's included; SD3 / PixArt: transformer blocks); nothing else changes."""
    if arch == "sdxl":
        den["transformer_layers_per_block"] = [*den["transformer_layers_per_block"][:-1], depth]
    elif arch in ("sd3", "pixart"):
        den["num_layers"] = depth
    else:
        raise ValueError(f"--depth applies to sdxl, sd3 and pixart (a deep transformer stack); {arch}'s UNet has "
                         "1 transformer layer per block: use --scale to shrink it")


def _shrink_clip(te: dict[str, Any], scale: float, min_layers: int = 1) -> None:
    te["hidden_size"] = _round(te["hidden_size"] * scale, 64)
    te["num_attention_heads"], te["intermediate_size"] = te["hidden_size"] // 64, te["hidden_size"] * 4
    te["num_hidden_layers"] = max(min_layers, round(te["num_hidden_layers"] * scale))
    te["projection_dim"] = te["hidden_size"]


def _shrink_t5(te: dict[str, Any], scale: float) -> None:
    te["d_model"] = _round(te["d_model"] * scale, 64)
    te["num_heads"], te["d_ff"] = te["d_model"] // 64, te["d_model"] * 5 // 2


def _shrink(arch: str, cfg: dict[str, dict[str, Any]], scale: float) -> None:
    """Every width (and the deep stacks) times ``scale``, the cross-component widths kept consistent."""
    den, vae = cfg["denoiser"], cfg["vae"]
    vae["block_out_channels"] = [_round(c * scale, 32) for c in vae["block_out_channels"]]
    if arch == "pixart":
        te = cfg["text_encoder"]
        _shrink_t5(te, scale)
        den["num_attention_heads"] = max(2, round(den["num_attention_heads"] * scale))
        den["cross_attention_dim"] = den["num_attention_heads"] * den["attention_head_dim"]
        den["caption_channels"] = te["d_model"]
        den["num_layers"] = max(2, round(den["num_layers"] * scale))
    elif arch == "sd3":
        clip_l, clip_g, t5 = cfg["text_encoder"], cfg["text_encoder_2"], cfg["text_encoder_3"]
        _shrink_clip(clip_l, scale, min_layers=2)  # SD3 conditions on the penultimate layer
        _shrink_clip(clip_g, scale, min_layers=2)
        _shrink_t5(t5, scale)
        t5["d_model"] = max(t5["d_model"], clip_l["hidden_size"] + clip_g["hidden_size"])  # CLIPs pad to T5's width
        t5["num_heads"], t5["d_ff"] = t5["d_model"] // 64, t5["d_model"] * 5 // 2
        den["num_attention_heads"] = max(2, round(den["num_attention_heads"] * scale))
        den["caption_projection_dim"] = den["num_attention_heads"] * den["attention_head_dim"]
        den["num_layers"] = max(2, round(den["num_layers"] * scale))
        den["joint_attention_dim"] = t5["d_model"]
        den["pooled_projection_dim"] = clip_l["projection_dim"] + clip_g["projection_dim"]
    else:
        for enc in TEXT_ENCODERS[arch]:  # SDXL conditions on the penultimate layer: at least 2
            _shrink_clip(cfg[enc], scale, min_layers=2 if arch == "sdxl" else 1)
        den["block_out_channels"] = [_round(c * scale, 64) for c in den["block_out_channels"]]
        if isinstance(den["attention_head_dim"], list):  # SD 2.x / SDXL: head counts, 64-wide heads
            den["attention_head_dim"] = [c // 64 for c in den["block_out_channels"]]
        den["cross_attention_dim"] = sum(cfg[enc]["hidden_size"] for enc in TEXT_ENCODERS[arch])
        if arch == "sdxl":  # 6 time ids x addition_time_embed_dim + text_encoder_2's pooled projection
            den["projection_class_embeddings_input_dim"] = (6 * den["addition_time_embed_dim"]
                                                            + cfg["text_encoder_2"]["projection_dim"])


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


def _text_side(arch: str, cfg: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The pipeline's text encoders and tokenizers, by their pipeline names."""
    import transformers  # noqa: PLC0415 -- transformers: seconds to import

    parts: dict[str, Any] = {}
    for enc in TEXT_ENCODERS[arch]:
        te_cfg, tok_cfg = _config_only(cfg[enc]), cfg[tokenizer_name(enc)]
        if te_cfg["model_type"] == "t5":
            parts[enc] = transformers.T5EncoderModel(transformers.T5Config(**te_cfg))
            tokenizer = tiny_t5_tokenizer()  # pad 0, eos 1, unk 2 as T5's; ids < 100 of the 32,128
            tokenizer.model_max_length = tok_cfg["model_max_length"]
        else:
            projected = te_cfg["architectures"] == ["CLIPTextModelWithProjection"]
            model_cls = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
            parts[enc] = model_cls(transformers.CLIPTextConfig(**te_cfg))
            tokenizer = clip_tokenizer(tok_cfg)
        parts[tokenizer_name(enc)] = tokenizer
    return parts


def build_pipeline(arch: str, scale: float = 1.0, latent: int | None = None, seed: int = 0,
                   depth: int | None = None) -> Any:
    """The random-weight diffusers pipeline (fp32, CPU) of ``arch`` from the configs in the repo."""
    import diffusers  # noqa: PLC0415 -- diffusers models: seconds to import

    cfg = component_configs(arch, scale, latent, depth)
    torch.manual_seed(seed)
    den_cls = getattr(diffusers, cfg["denoiser"]["_class_name"])
    denoiser = den_cls.from_config(_config_only(cfg["denoiser"]))
    vae = diffusers.AutoencoderKL.from_config(_config_only(cfg["vae"]))
    scheduler = getattr(diffusers, cfg["scheduler"]["_class_name"]).from_config(_config_only(cfg["scheduler"]))
    text = _text_side(arch, cfg)
    if arch == "pixart":
        return diffusers.PixArtAlphaPipeline(transformer=denoiser, vae=vae, scheduler=scheduler, **text)
    if arch == "sdxl":  # no watermarker (an optional package; the published pipeline default is True)
        return diffusers.StableDiffusionXLPipeline(unet=denoiser, vae=vae, scheduler=scheduler,
                                                   force_zeros_for_empty_prompt=True, add_watermarker=False, **text)
    if arch == "sd3":
        return diffusers.StableDiffusion3Pipeline(transformer=denoiser, vae=vae, scheduler=scheduler, **text)
    return diffusers.StableDiffusionPipeline(unet=denoiser, vae=vae, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False, **text)


def write_teacher(arch: str, out: str | Path, scale: float = 1.0, latent: int | None = None,
                  depth: int | None = None) -> Path:
    """Build and ``save_pretrained`` the teacher to ``out`` (skipped when a complete one with the
    same settings is there: building the real sizes takes minutes and 5-14 GB)."""
    out = Path(out)
    stamp = {"arch": arch, "scale": scale, "latent": latent, **({"depth": depth} if depth else {})}
    marker = out / "full_size.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    pipe = build_pipeline(arch, scale, latent, depth=depth)
    pipe.save_pretrained(out, safe_serialization=True)
    marker.write_text(json.dumps(stamp))
    return out


def denoiser_on_meta(arch: str) -> torch.nn.Module:
    """The full-size denoiser with parameters on the meta device (no memory)."""
    import diffusers  # noqa: PLC0415 -- diffusers models: seconds to import

    cfg = component_configs(arch)["denoiser"]
    with torch.device("meta"):
        return getattr(diffusers, cfg["_class_name"]).from_config(_config_only(cfg))
