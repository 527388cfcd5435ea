"""Memory a train worker saves with ``data.text_encoding: actors`` (PixArt's T5 off the trainers).

    python benchmarks/bench_text_encoding.py [--t5-layers 1] [--dtype float32]

A stand-in PixArt teacher is written to a temporary folder: the tiny test DiT and VAE, and a T5
encoder with T5-XXL's real width (d_model 4096, 64 heads x 64, gated-GELU d_ff 10240, 32,128-token
vocabulary) but ``--t5-layers`` layers instead of 24. Each mode then runs in a fresh process as a
train worker would: ``load_teacher`` (with or without the text encoder) and one batch of 16
prompts turned into conditioning (``trainer``: encoded there; ``actors``: 16 streamed
embeddings). Measured: the process's peak resident set (``VmHWM``) above what it held after its
imports. The saving is then computed for T5-XXL itself (4.76 B parameters), whose layers are the
stand-in's times 24: bytes = parameters x bytes per parameter of the dtype the worker loads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from wadi_core.models import load_teacher
from wadi_core.models.tiny import build_tiny_pixart_pipeline

from pipelines.data.text_encoding import EncodedPrompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

T5_XXL = {"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 10240, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "num_layers": 24}
BATCH = 16


def t5_params(num_layers: int) -> int:
    """Parameters of a T5 v1.1 encoder with T5-XXL's width and ``num_layers`` layers."""
    d, inner, ff, vocab = T5_XXL["d_model"], T5_XXL["d_kv"] * T5_XXL["num_heads"], T5_XXL["d_ff"], T5_XXL["vocab_size"]
    per_layer = 4 * d * inner + 3 * d * ff + 2 * d  # q k v o, wi_0 wi_1 wo, two layer norms
    rel_bias = 32 * T5_XXL["num_heads"]  # relative attention buckets (first layer)
    return vocab * d + num_layers * per_layer + rel_bias + d  # + final layer norm


def build_standin(out: Path, layers: int) -> Path:
    from transformers import T5Config, T5EncoderModel  # noqa: PLC0415 -- transformers: seconds to import

    pipe = build_tiny_pixart_pipeline()
    cfg = T5Config(**{**T5_XXL, "num_layers": layers}, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    encoder = T5EncoderModel(cfg)  # random weights: memory does not depend on their values
    pipe.register_modules(text_encoder=encoder)
    # The DiT's caption projection must take 4096-wide embeddings, as PixArt-alpha's does.
    from diffusers import PixArtTransformer2DModel  # noqa: PLC0415 -- diffusers models: seconds to import

    dit = PixArtTransformer2DModel.from_config({**pipe.transformer.config, "caption_channels": 4096})
    pipe.register_modules(transformer=dit)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(teacher: str, mode: str, dtype: str) -> dict:
    """One train worker's model loading and one batch's conditioning, in this (fresh) process."""
    torch.set_num_threads(1)
    Path("/proc/self/clear_refs").write_text("5")  # peak-RSS mark := current RSS (after imports)
    before = _status("VmRSS")
    t = load_teacher(teacher, dtype=getattr(torch, dtype), text_encoder=mode == "trainer")
    prompts = [f"a photo of a red circle number {i}" for i in range(BATCH)]
    if mode == "trainer":
        cond = t.encode_prompts(prompts)
    else:  # what arrives from the actors: embeddings + masks
        cond = EncodedPrompts(prompts, np.zeros((BATCH, t.max_text_length, 4096), np.float32),
                              np.ones((BATCH, t.max_text_length), np.uint8)).cond("cpu", t.dtype)
    encoder_params = sum(p.numel() for p in t.text_encoder.parameters()) if t.text_encoder is not None else 0
    return {"mode": mode, "peak_growth": _status("VmHWM") - before, "encoder_params": encoder_params,
            "cond": list(cond.embeds.shape)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t5-layers", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype the worker loads the teacher in (the trainer today: float32)")
    ap.add_argument("--worker", nargs=2, metavar=("TEACHER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.dtype)))
        return
    with tempfile.TemporaryDirectory(prefix="wadi-t5-standin-") as tmp:
        teacher = build_standin(Path(tmp) / "teacher", args.t5_layers)
        res = {}
        for mode in ("trainer", "actors"):
            cmd = [sys.executable, __file__, "--dtype", args.dtype, "--worker", str(teacher), mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[mode] = json.loads(out.strip().splitlines()[-1])
    gib = 2 ** 30
    bytes_per = 4 if args.dtype == "float32" else 2
    n = res["trainer"]["encoder_params"]
    saved = res["trainer"]["peak_growth"] - res["actors"]["peak_growth"]
    assert n == t5_params(args.t5_layers), (n, t5_params(args.t5_layers))
    print(f"stand-in T5: {args.t5_layers} layer(s) at T5-XXL width, {n / 1e6:.1f} M parameters; worker dtype {args.dtype}")
    for mode in ("trainer", "actors"):
        r = res[mode]
        print(f"  {mode:<8} peak RSS growth {r['peak_growth'] / gib:6.2f} GiB  (text encoder params in the worker: "
              f"{r['encoder_params'] / 1e6:.1f} M, conditioning {r['cond']})")
    print(f"  saved per train worker: {saved / gib:.2f} GiB measured; parameters alone {n * bytes_per / gib:.2f} GiB")
    xxl = t5_params(24)
    print(f"T5-XXL ({xxl / 1e9:.2f} B parameters): {xxl * 4 / 1e9:.1f} GB in float32 (how the trainer loads the teacher), "
          f"{xxl * 2 / 1e9:.1f} GB in bf16 - per training GPU, plus encoder activations")


if __name__ == "__main__":
    main()
