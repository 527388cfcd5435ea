"""Peak memory of one VSD iteration: one shared frozen base vs three separate model copies.

    python benchmarks/bench_vsd_memory.py                      # CPU, SD1.5 layout at 0.4x width
    python benchmarks/bench_vsd_memory.py --width 1.0 --latent 64 --batch 4 --device cuda   # real SD1.5 UNet

Both variants run the same ``wadi_core.vsd.vsd_step`` (generator update + fake update, AdamW,
same LoRaD student / fake adapters, same batch); only the role -> weights mapping differs:

* ``shared``: ``WaDiDistiller``: teacher, fake and student are adapters "None", "fake",
  "student" on ONE frozen UNet;
* ``copies``: the layout of the public WaDi code and DMD2: three full UNets (frozen teacher,
  fake = copy + LoRaD fake, student = copy + LoRaD student).

Method. Each variant runs in a fresh Python subprocess, so allocator caches of one cannot leak
into the other. On CUDA the number is ``torch.cuda.max_memory_allocated`` over build + two steps
(reset after imports). On CPU, peak memory = the exact bytes of every tensor the models hold
(base weights, copies, adapters, buffers; shared storage counted once) + the peak growth of the
resident set during two full VSD steps: the kernel's peak-RSS mark (VmHWM) is reset through
``/proc/self/clear_refs`` just before the first step and read after the second, minus the RSS
at the reset. This counts gradients, AdamW states (allocated in step 1), activations, LoRaD's
rotated weights and the allocator's slack, but not the transient garbage of building models
from config (random init), which RSS would otherwise count once for the shared base and not
for the deep copies. The raw RSS growth since imports is printed too. Weights are random (built
from config), the text conditioning is random embeddings (no text encoder or VAE: they are the
same in both layouts). Printed: both peaks and the ratio shared / copies (target <= 0.5).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from proc_memory import reset_peak_rss, status_bytes
from wadi_core.adapters import adapter_parameters, apply_adapter, set_adapter
from wadi_core.models import Cond, Teacher, denoiser_config
from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller, make_updaters, vsd_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _unet_config(width: float) -> dict:
    cfg = denoiser_config("sd15")
    cfg["block_out_channels"] = [int(round(c * width / 32)) * 32 for c in cfg["block_out_channels"]]
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _make_teacher(args):
    from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: PLC0415 -- diffusers models: seconds to import

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**_unet_config(args.width), "sample_size": args.latent})
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    stub = nn.Linear(2, 2)  # no VAE / text encoder: identical in both layouts, not measured
    teacher = Teacher(unet, stub, stub, None, scheduler, "sd").to(args.device).freeze()
    teacher._null = Cond(torch.zeros(1, 77, 768, device=args.device))
    return teacher


class ThreeCopiesDistiller:
    """Same interface as WaDiDistiller, but every role is its own full UNet (public WaDi / DMD2)."""

    def __new__(cls, teacher, cfg):
        class _Copies(WaDiDistiller):
            def __init__(self, teacher, cfg):
                self.teacher, self.cfg, self._active = teacher, cfg, None
                self.alphas_cumprod = teacher.alphas_cumprod.to(teacher.device)
                base = teacher.denoiser
                self.models = {"teacher": base}
                for role, spec in (("student", cfg.student), ("fake", cfg.fake)):
                    m = copy.deepcopy(base)
                    apply_adapter(m, spec, role, "sd")
                    set_adapter(m, role)
                    if cfg.gradient_checkpointing:
                        m.enable_gradient_checkpointing()
                    self.models[role] = m

            def parameters(self, role):
                return adapter_parameters(self.models[role], role)

            def role(self, role):
                @contextlib.contextmanager
                def swap():
                    previous = self.teacher.denoiser
                    self.teacher.denoiser = self.models[role]
                    try:
                        yield
                    finally:
                        self.teacher.denoiser = previous

                return swap()

        return _Copies(teacher, cfg)


def _tensor_bytes(modules) -> int:
    """Bytes of all parameters and buffers, each storage once."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def run_variant(args) -> dict:

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    teacher = _make_teacher(args)
    cfg = VSDConfig(student=AdapterSpec("lorad", args.student_rank), fake=AdapterSpec("lorad", args.fake_rank),
                    gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision)
    distiller = WaDiDistiller(teacher, cfg) if args.variant == "shared" else ThreeCopiesDistiller(teacher, cfg)
    models = list(getattr(distiller, "models", {"teacher": teacher.denoiser}).values())
    updaters = make_updaters(distiller)
    gen = torch.Generator(device="cuda" if cuda else "cpu").manual_seed(0)
    cond = Cond(torch.randn(args.batch, 77, 768, generator=torch.Generator().manual_seed(1)).to(args.device))
    if not cuda:
        rss_before = reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(2):  # the 2nd step runs with AdamW states allocated
        vsd_step(distiller, cond, updaters["student"], updaters["fake"], gen)
    seconds = (time.perf_counter() - t0) / 2
    weights = _tensor_bytes(models)
    out = {"variant": args.variant, "seconds_per_step": seconds, "model_tensor_bytes": weights,
           "base_params": sum(p.numel() for p in teacher.denoiser.parameters() if not p.requires_grad),
           "student_params": sum(p.numel() for p in distiller.parameters("student")),
           "fake_params": sum(p.numel() for p in distiller.parameters("fake"))}
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - base_bytes
    else:
        out["step_growth_bytes"] = status_bytes("VmHWM") - rss_before
        out["peak_bytes"] = weights + out["step_growth_bytes"]
        out["raw_rss_growth_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - import_rss
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=0.4, help="UNet width relative to SD1.5 (1.0 = the real one)")
    ap.add_argument("--latent", type=int, default=32, help="latent side (SD1.5 at 512 px: 64)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--student-rank", type=int, default=0, help="0: 256 scaled by width")
    ap.add_argument("--fake-rank", type=int, default=0, help="0: 32 scaled by width")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", choices=["shared", "copies"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.student_rank = args.student_rank or max(8, int(256 * args.width) // 8 * 8)
    args.fake_rank = args.fake_rank or max(4, int(32 * args.width) // 4 * 4)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("shared", "copies"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            a for a in sys.argv[1:] if a != "--variant"]
        cmd += ["--student-rank", str(args.student_rank), "--fake-rank", str(args.fake_rank)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    s, c = results["shared"], results["copies"]
    print(f"UNet: SD1.5 layout x{args.width} width, {s['base_params'] / 1e6:.1f} M base params, latent "
          f"{args.latent}x{args.latent}, batch {args.batch}, LoRaD student r={args.student_rank} "
          f"({s['student_params'] / 1e6:.2f} M), fake r={args.fake_rank} ({s['fake_params'] / 1e6:.2f} M), "
          f"checkpointing={args.gradient_checkpointing}, precision={args.mixed_precision}, device={args.device}")
    mib = 2 ** 20
    if args.device.startswith("cuda"):
        print(f"peak CUDA allocated: shared base {s['peak_bytes'] / mib:.0f} MiB, three copies {c['peak_bytes'] / mib:.0f} MiB")
    else:
        for name, r in (("shared base", s), ("three copies", c)):
            print(f"{name}: model tensors {r['model_tensor_bytes'] / mib:.0f} MiB + peak growth during 2 steps "
                  f"{r['step_growth_bytes'] / mib:.0f} MiB = {r['peak_bytes'] / mib:.0f} MiB "
                  f"(raw RSS growth since imports {r['raw_rss_growth_bytes'] / mib:.0f} MiB)")
    print(f"step time: shared {s['seconds_per_step']:.2f} s, copies {c['seconds_per_step']:.2f} s")
    print(f"ratio shared / copies = {s['peak_bytes'] / c['peak_bytes']:.2f}x (target <= 0.5x)")
    if not args.device.startswith("cuda"):
        print(f"raw RSS-growth ratio = {s['raw_rss_growth_bytes'] / c['raw_rss_growth_bytes']:.2f}x")


if __name__ == "__main__":
    main()
