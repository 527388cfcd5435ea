"""diffusers -> original Stable Diffusion (LDM / CompVis) key layout, for one-file checkpoints.

The inverse of diffusers' ``from_single_file`` conversion (``diffusers.loaders.single_file_utils``):
a key renaming, plus 1x1-conv reshapes of the VAE's mid-block attention and the q/k/v concatenation
of OpenCLIP's attention (SD2.x text encoder). Layouts:

* UNet      ``model.diffusion_model.{input_blocks,middle_block,output_blocks,time_embed,out}.*``
* VAE       ``first_stage_model.{encoder,decoder}.{down,mid,up}.*``
* text      SD1.x CLIP ``cond_stage_model.transformer.text_model.*``;
            SD2.x OpenCLIP ``cond_stage_model.model.{transformer.resblocks,token_embedding,...}``;
            SDXL CLIP-L ``conditioner.embedders.0.transformer.text_model.*`` and OpenCLIP bigG
            ``conditioner.embedders.1.model.*`` with its ``text_projection`` (stored transposed)
* SDXL UNet's added embedding (pooled text + time ids) ``add_embedding.linear_{1,2}`` -> ``label_emb.0.{0,2}``

The single file carries weights only: load it with ``StableDiffusionPipeline.from_single_file(
path, config=<diffusers dir>)`` (SDXL: ``StableDiffusionXLPipeline``) so the scheduler, tokenizer and model configs come from that dir
(our export's one-step scheduler is also kept in the file's metadata, ``wadi.scheduler_config``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from safetensors.torch import save_file
from torch import Tensor

from wadi_core.storage import load_component_weights

__all__ = ["unet_to_ldm", "vae_to_ldm", "clip_to_ldm", "open_clip_to_ldm", "pipeline_to_ldm",
           "save_single_file", "text_encoder_layout"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _split(key: str, n: int) -> tuple[list[str], str]:
    parts = key.split(".")
    return parts[:n], ".".join(parts[n:])


def _rename(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    head, _, leaf = rest.rpartition(".")  # head = submodule path, leaf = weight / bias
    for new, old in table:
        if head == new:
            return f"{old}.{leaf}"
    return rest


def unet_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """A ``UNet2DConditionModel`` state dict (SD1.x / SD2.x / SDXL layout) -> LDM ``UNetModel`` keys (unprefixed).

    Down block ``b`` takes LDM input blocks ``1 + b*(L+1) ...`` (L resnet/attention layers, then the
    downsampler); up block ``b`` takes output blocks ``b*(L+1) ...`` with its upsampler at index 2
    of the last one when the block has attentions, else index 1 (LDM's ``TimestepEmbedSequential``).
    """
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError(f"layers_per_block={lpb!r}: the LDM layout needs one layer count for all blocks (SD1.x/2.x)")
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        top = next((k for k in _UNET_TOP if key.startswith(k + ".")), None)
        if top is not None:
            out[_UNET_TOP[top] + key[len(top):]] = value
            continue
        p, rest = _split(key, 4)
        if p[0] == "down_blocks":
            b, kind, i = int(p[1]), p[2], int(p[3])
            base = 1 + b * (lpb + 1)
            if kind == "resnets":
                out[f"input_blocks.{base + i}.0.{_rename(rest, _UNET_RESNET)}"] = value
            elif kind == "attentions":
                out[f"input_blocks.{base + i}.1.{rest}"] = value
            elif kind == "downsamplers":  # rest = conv.weight / conv.bias
                out[f"input_blocks.{base + lpb}.0.op.{rest.split('.', 1)[1]}"] = value
            else:
                raise KeyError(f"unexpected UNet key {key}")
        elif p[0] == "up_blocks":
            b, kind, i = int(p[1]), p[2], int(p[3])
            base = b * (lpb + 1)
            if kind == "resnets":
                out[f"output_blocks.{base + i}.0.{_rename(rest, _UNET_RESNET)}"] = value
            elif kind == "attentions":
                out[f"output_blocks.{base + i}.1.{rest}"] = value
            elif kind == "upsamplers":
                slot = 2 if up_has_attn[b] else 1
                out[f"output_blocks.{base + lpb}.{slot}.{rest}"] = value
            else:
                raise KeyError(f"unexpected UNet key {key}")
        elif p[0] == "mid_block":
            p, rest = _split(key, 3)
            kind, i = p[1], int(p[2])
            if kind == "resnets":  # middle_block = resnet, attention, resnet
                out[f"middle_block.{2 * i}.{_rename(rest, _UNET_RESNET)}"] = value
            elif kind == "attentions":
                out[f"middle_block.{1 + 2 * i}.{rest}"] = value
            else:
                raise KeyError(f"unexpected UNet key {key}")
        else:
            raise KeyError(f"UNet key {key} has no Stable Diffusion (LDM) equivalent: is this an SD1.x/2.x UNet?")
    return out


def vae_to_ldm(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """An ``AutoencoderKL`` state dict -> LDM ``AutoencoderKL`` keys (unprefixed).

    Decoder up blocks are numbered in reverse in LDM (``up.{n-1-i}``), resnet shortcuts are
    ``nin_shortcut``, and the mid-block attention is 1x1 convs (weights get two trailing 1-dims).
    """
    n_up = len(config["up_block_types"])
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        coder, _, rest = key.partition(".")
        if coder in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        if coder not in ("encoder", "decoder"):
            raise KeyError(f"unexpected VAE key {key}")
        p, tail = _split(rest, 3)
        if p[0] in ("down_blocks", "up_blocks"):
            i, kind = int(p[1]), p[2]
            blk = i if p[0] == "down_blocks" else n_up - 1 - i
            name = "down" if p[0] == "down_blocks" else "up"
            if kind == "resnets":
                j, _, leaf = tail.partition(".")
                out[f"{coder}.{name}.{blk}.block.{j}.{leaf.replace('conv_shortcut', 'nin_shortcut')}"] = value
            elif kind in ("downsamplers", "upsamplers"):  # tail = 0.conv.weight
                out[f"{coder}.{name}.{blk}.{name}sample.{tail.split('.', 1)[1]}"] = value
            else:
                raise KeyError(f"unexpected VAE key {key}")
        elif p[0] == "mid_block":
            kind, i = p[1], int(p[2])
            if kind == "resnets":
                out[f"{coder}.mid.block_{i + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"] = value
            else:  # attentions: linear -> 1x1 conv
                new = _rename(tail, _VAE_ATTN)
                if value.ndim == 2:
                    value = value[:, :, None, None]
                out[f"{coder}.mid.attn_{i + 1}.{new}"] = value
        else:
            top = rest.split(".")[0]
            out[f"{coder}.{_VAE_TOP.get(top, top)}{rest[len(top):]}"] = value
    return out


def _text_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers >= 5.6 flattens ``CLIPTextModel`` (no ``text_model.`` prefix); accept both."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_ldm(state: Mapping[str, Tensor], prefix: str = CLIP_PREFIX) -> dict[str, Tensor]:
    """SD1.x: HF ``CLIPTextModel`` keys under ``cond_stage_model.transformer.text_model.`` (prefixed);
    SDXL's CLIP-L: ``prefix=SDXL_CLIP_PREFIX``."""
    return {prefix + k: v for k, v in _text_keys(state).items()}


_OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def open_clip_to_ldm(state: Mapping[str, Tensor], prefix: str = OPEN_CLIP_PREFIX) -> dict[str, Tensor]:
    """SD2.x: HF ``CLIPTextModel`` -> OpenCLIP ``cond_stage_model.model.*`` (prefixed); q/k/v are
    concatenated into ``attn.in_proj_{weight,bias}``. No ``text_projection`` (SD2 does not use it).
    SDXL's bigG (``CLIPTextModelWithProjection``, ``prefix=SDXL_OPEN_CLIP_PREFIX``): its projection is
    OpenCLIP's ``text_projection``, a ``(hidden, proj)`` matrix applied as ``x @ P``: the Linear weight transposed."""
    src = _text_keys(state)
    out: dict[str, Tensor] = {}
    if "text_projection.weight" in src:
        out[prefix + "text_projection"] = src.pop("text_projection.weight").T.contiguous()
    top = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    layers = sorted({int(k.split(".")[2]) for k in src if k.startswith("encoder.layers.")})
    for k, v in src.items():
        if k in top:
            out[prefix + top[k]] = v
        elif not k.startswith("encoder.layers."):
            raise KeyError(f"text encoder key {k} has no OpenCLIP equivalent")
    for i in layers:
        pre, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[dst + f"attn.in_proj_{leaf}"] = torch.cat([src[pre + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            for new, old in _OPEN_CLIP_LAYER:
                out[dst + f"{old}.{leaf}"] = src[pre + f"{new}.{leaf}"]
    return out


def text_encoder_layout(text_config: Mapping[str, Any]) -> Literal["clip", "openclip"]:
    """SD1.x uses OpenAI CLIP (quick_gelu); SD2.x uses OpenCLIP ViT-H (gelu)."""
    return "openclip" if text_config.get("hidden_act") == "gelu" else "clip"


def pipeline_to_ldm(pipeline_dir: str | os.PathLike, text_layout: str = "auto",
                    dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """All weights of a diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` folder in
    the single-file LDM layout (SDXL's two text encoders have fixed layouts: ``text_layout`` is ignored)."""
    root = Path(pipeline_dir)
    index = json.loads((root / "model_index.json").read_text())
    kind = index.get("_class_name")
    if kind not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ValueError(f"{root} holds a {kind}: single-file export covers SD1.x / SD2.x / SDXL pipeline folders "
                         "(PixArt has no LDM single-file layout; use --format diffusers)")
    unet, unet_cfg = load_component_weights(root, "unet")
    vae, vae_cfg = load_component_weights(root, "vae")
    text, text_cfg = load_component_weights(root, "text_encoder")
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet, unet_cfg).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae, vae_cfg).items()})
    if kind == "StableDiffusionXLPipeline":  # CLIP-L as embedder 0, OpenCLIP bigG (+ projection) as embedder 1
        out.update(clip_to_ldm(text, SDXL_CLIP_PREFIX))
        out.update(open_clip_to_ldm(load_component_weights(root, "text_encoder_2")[0], SDXL_OPEN_CLIP_PREFIX))
    else:
        layout = text_encoder_layout(text_cfg) if text_layout == "auto" else text_layout
        out.update(open_clip_to_ldm(text) if layout == "openclip" else clip_to_ldm(text))
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}


def save_single_file(pipeline_dir: str | os.PathLike, out_path: str | os.PathLike, *, text_layout: str = "auto",
                     dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``pipeline_dir`` as one LDM-layout ``.safetensors`` (scheduler config in the metadata)."""
    root, out = Path(pipeline_dir), Path(out_path)
    state = pipeline_to_ldm(root, text_layout, dtype)
    index = json.loads((root / "model_index.json").read_text())
    xl = index.get("_class_name") == "StableDiffusionXLPipeline"
    meta = {"format": "pt", "wadi.layout": "ldm-stable-diffusion-xl" if xl else "ldm-stable-diffusion"}
    sched = root / "scheduler" / "scheduler_config.json"
    if sched.exists():
        meta["wadi.scheduler_config"] = sched.read_text()
    meta.update(metadata or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=meta)
    return out
