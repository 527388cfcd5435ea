"""A prepared check of the GPU path, for one GPU and at most ~8 minutes; prints one table.

    python benchmarks/gpu_check.py                 # one CUDA GPU, SD1.5 sizes, fp16
    python benchmarks/gpu_check.py --smoke         # CPU, tiny sizes, seconds (what the tests run)

Needs torch, diffusers and transformers only: it imports ``wadi_core`` and
``pipelines.runtime.collectives``, neither of which imports ray, deepspeed or mlflow. Weights are random
(built from the configs in the repo): speed and memory do not depend on their values.

1. ``vsd``: one ``vsd_step`` (student + fake update, AdamW, LoRaD r=256 / r=32) on the SD1.5 UNet
   at 64x64 latents, fp16 autocast, gradient checkpointing: step time and peak CUDA memory with
   one shared frozen base vs three model copies (``benchmarks/bench_vsd_memory.py``, a fresh
   process per variant).
2. ``adapters``: one LoRaD layer forward + backward against full fine-tuning, LoRA and the
   public code's hook-style LoRaD at SD1.5 layer shapes and token counts, fp16 autocast
   (``benchmarks/bench_adapters.py``).
3. ``collectives``: the train loop's flag / counter all-reduces (``pipelines.runtime.collectives``) on a
   1-rank NCCL group with CUDA tensors, their answers, and the refusal of a CPU tensor.
4. ``generation``: images/s of the student (1 step, no CFG, merged = a plain UNet pass) and the
   teacher (25 DDIM steps with CFG, two UNet passes per step), text encoding and VAE decoding
   included, SD1.5 shapes (CLIP ViT-L text encoder, 512 px), fp16.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_adapters as ba
import bench_vsd_memory
import torch  # noqa: E402
import torch.distributed as dist

from wadi_core.models import Cond, Teacher, denoiser_config
from wadi_core.models.tiny import build_tiny_sd_pipeline, tiny_clip_tokenizer

from pipelines.runtime.collectives import all_ranks_true, any_rank_true, sum_over_ranks

Row = tuple[str, str, str]  # (section, what, value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------ 1. VSD
def check_vsd(args: argparse.Namespace) -> list[Row]:
    """bench_vsd_memory.py, shared vs copies, each in a fresh process (clean peak statistics)."""
    flags = ["--width", "1.0", "--latent", "64", "--batch", str(args.vsd_batch), "--device", "cuda",
             "--mixed-precision", "fp16", "--gradient-checkpointing"]
    rank_flags = ["--student-rank", "256", "--fake-rank", "32"]
    out: dict[str, dict[str, Any]] = {}
    if args.smoke:  # in this process: the smoke run checks the code path, not the numbers
        for variant in ("shared", "copies"):
            ns = argparse.Namespace(width=0.1, latent=8, batch=1, device="cpu", mixed_precision="no",
                                    gradient_checkpointing=False, student_rank=8, fake_rank=4, threads=1,
                                    variant=variant)
            out[variant] = bench_vsd_memory.run_variant(ns)
    for variant in () if args.smoke else ("shared", "copies"):
        cmd = [sys.executable, str(HERE / "bench_vsd_memory.py"), "--variant", variant, *flags, *rank_flags]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.section_timeout)
        if res.returncode != 0:
            raise RuntimeError(f"bench_vsd_memory.py --variant {variant} failed:\n{res.stderr[-3000:]}")
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    s, c = out["shared"], out["copies"]
    gib = 2 ** 30
    size = "tiny UNet, CPU" if args.smoke else f"SD1.5 UNet, 64x64 latents, batch {args.vsd_batch}, fp16"
    return [
        ("vsd", f"UNet base params ({size})", f"{s['base_params'] / 1e6:.1f} M"),
        ("vsd", "step time shared / three copies", f"{s['seconds_per_step']:.3f} s / {c['seconds_per_step']:.3f} s"),
        ("vsd", "peak memory shared / three copies",
         f"{s['peak_bytes'] / gib:.2f} GiB / {c['peak_bytes'] / gib:.2f} GiB "
         f"(ratio {s['peak_bytes'] / c['peak_bytes']:.2f})"),
    ]


# ------------------------------------------------------------------------------- 2. adapters
def check_adapters(args: argparse.Namespace, device: torch.device) -> list[Row]:
    shapes = [(64, 64, 16, 2)] if args.smoke else ba.SHAPES
    rank = 8 if args.smoke else 256
    autocast = None if args.smoke else torch.float16
    mem = ba.Memory(device) if device.type == "cuda" else None
    rows: list[Row] = []
    for shape in shapes:
        t = ba.time_shape(shape, rank, 2 if args.smoke else 5, device, autocast)
        in_f, out_f, tokens, batch = shape
        label = f"{in_f}->{out_f}, {batch}x{tokens} tokens"
        value = (f"full {t['full']:.2f} | lorad {t['lorad']:.2f} | lora {t['lora']:.2f} | hook {t['hook']:.2f} ms; "
                 f"lorad/full {t['lorad'] / t['full']:.2f}, hook/lorad {t['hook'] / t['lorad']:.2f}")
        if mem is not None:
            m = ba.memory_shape(shape, rank, device, autocast, mem)
            value += f"; peak MB lorad {m['lorad']:.0f} / full {m['full']:.0f} / hook {m['hook']:.0f}"
        rows.append(("adapters", label, value))
    return rows


# ---------------------------------------------------------------------------- 3. collectives
def check_collectives(args: argparse.Namespace, device: torch.device) -> list[Row]:

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        t0 = time.perf_counter()
        answers = (all_ranks_true(True, device), all_ranks_true(False, device), any_rank_true(True, device),
                   sum_over_ranks([3, 4], device))
        _sync(device)
        ms = 1000 * (time.perf_counter() - t0) / 4
        ok = answers == (True, False, True, [3, 4])
        refused = "n/a (gloo)"
        if backend == "nccl":
            try:
                all_ranks_true(True, "cpu")
                refused = "NO: a CPU tensor was accepted"
            except ValueError:
                refused = "yes"
    finally:
        dist.destroy_process_group()
    if not ok:
        raise RuntimeError(f"collectives gave wrong answers on {backend}: {answers}")
    return [("collectives", f"1-rank {backend} group on {device}", f"answers right, {ms:.2f} ms per call"),
            ("collectives", "CPU tensor refused under NCCL", refused)]


# ----------------------------------------------------------------------------- 4. generation
def _sd15_teacher(device: torch.device, dtype: torch.dtype, smoke: bool) -> Any:
    """A random-weight teacher with SD1.5's UNet / VAE / CLIP-L shapes (tiny ones in smoke mode)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: PLC0415 -- slow import
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415 -- transformers: seconds to import

    torch.manual_seed(0)
    if smoke:
        p = build_tiny_sd_pipeline()
        return Teacher(p.unet, p.vae, p.text_encoder, p.tokenizer, p.scheduler, "sd").to(device).freeze()
    tokenizer = tiny_clip_tokenizer()  # character-level: what it costs is nothing next to the models
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        unet = UNet2DConditionModel.from_config({k: v for k, v in denoiser_config("sd15").items()
                                                 if not k.startswith("_")})
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), sample_size=512,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=max(49408, len(tokenizer)), hidden_size=768,
                                            intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu",
                                            bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
                                            pad_token_id=len(tokenizer) - 1))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1)
    for m in (unet, vae, text):
        m.to(dtype)
    return Teacher(unet, vae, text, tokenizer, scheduler, "sd", max_text_length=77).to(device).freeze()


def check_generation(args: argparse.Namespace, device: torch.device) -> list[Row]:
    from diffusers import DDIMScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

    dtype = torch.float32 if args.smoke else torch.float16
    teacher = _sd15_teacher(device, dtype, args.smoke)
    batch, steps, guidance, a = (2, 2, 3.0, 0.0047) if args.smoke else (args.gen_batch, 25, 3.0, 0.0047)
    prompts = [f"a photo of object {i}" for i in range(batch)]
    ddim = DDIMScheduler.from_config(teacher.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=False,
                                     prediction_type="epsilon")
    shape = (batch, *teacher.latent_shape)

    @torch.no_grad()
    def student() -> None:  # x0 = (z - sqrt(1 - a) eps) / sqrt(a) at t = T-1, then decode
        z = torch.randn(shape, device=device, dtype=dtype)
        eps = teacher.predict_eps(z, 999, teacher.encode_prompts(prompts))
        teacher.decode(((z.float() - (1 - a) ** 0.5 * eps.float()) / a ** 0.5).to(dtype))

    @torch.no_grad()
    def teacher_cfg() -> None:  # DDIM with CFG: conditional + unconditional pass per step
        ddim.set_timesteps(steps, device=device)
        latents = torch.randn(shape, device=device, dtype=dtype)
        both = Cond.cat([teacher.null_cond(batch), teacher.encode_prompts(prompts)])
        for t in ddim.timesteps:
            eps_u, eps_c = teacher.predict_eps(torch.cat([latents, latents]), t, both).chunk(2)
            latents = ddim.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample.to(dtype)
        teacher.decode(latents)

    def images_per_s(fn: Callable[[], None], reps: int) -> float:
        fn()  # warm-up (kernels, allocator)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        return reps * batch / (time.perf_counter() - t0)

    s = images_per_s(student, 2 if args.smoke else 10)
    t = images_per_s(teacher_cfg, 1 if args.smoke else 3)
    size = "tiny, CPU" if args.smoke else f"SD1.5 shapes, {8 * teacher.latent_shape[1]} px, fp16, batch {batch}"
    return [("generation", f"student 1 step ({size})", f"{s:.2f} images/s"),
            ("generation", f"teacher {steps} steps, CFG {guidance:g} (2 passes/step)", f"{t:.2f} images/s"),
            ("generation", "student / teacher", f"{s / t:.1f}x")]


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (a test of this script, seconds)")
    p.add_argument("--only", default="vsd,adapters,collectives,generation", help="comma list of sections")
    p.add_argument("--vsd-batch", type=int, default=4, help="VSD batch (the paper: 16 per GPU)")
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--section-timeout", type=int, default=300, help="seconds per VSD variant process")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU (or --smoke for the CPU check of the script itself)")
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(1)
    info = f"torch {torch.__version__}, " + (torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU")
    sections: dict[str, Callable[[], list[Row]]] = {
        "vsd": lambda: check_vsd(args),
        "adapters": lambda: check_adapters(args, device),
        "collectives": lambda: check_collectives(args, device),
        "generation": lambda: check_generation(args, device),
    }
    rows: list[Row] = []
    started = time.perf_counter()
    for name in [s.strip() for s in args.only.split(",") if s.strip()]:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        rows += sections[name]()
        rows.append((name, "section time", f"{time.perf_counter() - t0:.1f} s"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    width = max(len(w) for _, w, _ in rows)
    print(f"\ngpu_check ({'smoke, ' if args.smoke else ''}{info}), total {time.perf_counter() - started:.0f} s")
    print(f"{'section':<12} {'what':<{width}}  value")
    print("-" * (16 + width + 40))
    for section, what, value in rows:
        print(f"{section:<12} {what:<{width}}  {value}")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
