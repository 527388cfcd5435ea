"""LoRaD cost on SD1.5 layer sizes: forward+backward time and peak memory against its baselines.

    OMP_NUM_THREADS=1 python benchmarks/bench_adapters.py [--threads 1] [--reps 5] [--device cpu|cuda]

Per layer (one ``nn.Linear``, input ``(batch, tokens, in)`` requiring grad as inside a network):
- ``full``: full fine-tuning of the layer (weight and bias trainable): LoRaD's floor, since LoRaD
  needs the full ``dL/dW_rot`` to get ``dL/dTheta``;
- ``lorad``: this repo's fused LoRaD (``wadi_core.adapters``), rank ``--rank``;
- ``lora``: LoRA at the same rank;
- ``hook``: the public code's style: base matmul run and discarded, then ``W_rot`` by plain autograd;
- ``merged`` vs ``plain``: forward (inference, no grad) of a merged LoRaD layer vs a plain Linear.

Time: median over ``--reps`` interleaved repetitions (methods alternate, so load drift hits all
alike). On CPU the clock is the process's CPU time (``time.process_time``): with one thread that is
the compute time, and time the scheduler gives other jobs on a shared machine is not counted (they
still compete for caches and memory bandwidth: rerun on a quiet machine for clean ratios); on CUDA,
synchronised wall time. Memory, CUDA: ``max_memory_allocated`` above what was allocated before the
step. Memory, CPU (no allocator statistics there): the process's peak resident set (``VmHWM``, reset
through ``/proc/self/clear_refs``) above the resident set before the step, with glibc told to serve
every block > 64 KiB by mmap so freed tensors really leave the RSS. Both count everything the step
allocates: activations saved for backward, transients, and the gradients it leaves behind
(``full``'s ``dL/dW`` included). On CPU the memory pass runs in a child process (fresh heap, mmap
setting from the start); the timing process keeps glibc's defaults (the mmap setting would make
every large temporary pay fresh page faults).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from proc_memory import reset_peak_rss, status_bytes
from wadi_core.adapters import add_adapter, merge_adapter, set_adapter
from wadi_core.adapters.lorad import rotate_pairs

# (in, out, tokens per image, batch): SD1.5 attention at 64x64 latents (320 ch), feed-forward GEGLU
# projection at 32x32 (640 -> 2*4*640), attention at 16x16 and 8x8 (1280 ch); batch 16 = the paper's
# batch per GPU (the realistic case), batch 2 = small-batch cases where the rank-r matmuls weigh most.
SHAPES = [(320, 320, 4096, 2), (640, 5120, 1024, 2), (1280, 1280, 256, 2), (1280, 1280, 64, 16),
          (1280, 1280, 256, 16), (640, 5120, 1024, 16)]


class HookLoRaD(nn.Module):
    """The public code's pattern: the base layer runs, its output is replaced by a recomputation."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.base = base
        self.A, self.B = nn.Parameter(A.clone()), nn.Parameter(B.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ = self.base(x)  # what a forward hook sees: computed, then thrown away
        w_rot = rotate_pairs(self.base.weight, self.A.float() @ self.B.float()).to(x.dtype)
        return F.linear(x, w_rot, self.base.bias)


class Memory:
    """Peak memory of a callable above the memory in use before it, in MB."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so big frees go back to the OS
            libc.mallopt(-1, 0)          # M_TRIM_THRESHOLD

    def peak(self, fn: Callable[[], None]) -> float:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - before) / 2**20
        before = reset_peak_rss()
        fn()
        return (status_bytes("VmHWM") - before) / 2**20


def build(in_f: int, out_f: int, rank: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).to(device)
    full = nn.Linear(in_f, out_f).to(device)
    full.load_state_dict(base.state_dict())
    lorad = nn.Sequential(nn.Linear(in_f, out_f).to(device))
    lorad.load_state_dict({"0." + k: v for k, v in base.state_dict().items()})
    add_adapter(lorad, "lorad", "a", rank, ["0"])
    with torch.no_grad():
        lorad[0].adapters["a"].A.normal_(0, 0.02)
    set_adapter(lorad, "a")
    lora = nn.Sequential(nn.Linear(in_f, out_f).to(device))
    add_adapter(lora, "lora", "a", rank, ["0"])
    set_adapter(lora, "a")
    hook_base = nn.Linear(in_f, out_f).to(device).requires_grad_(False)
    ad = lorad[0].adapters["a"]
    hook = HookLoRaD(hook_base, ad.A.detach(), ad.B.detach())
    merged = nn.Sequential(nn.Linear(in_f, out_f).to(device))
    add_adapter(merged, "lorad", "a", rank, ["0"])
    set_adapter(merged, "a")
    merge_adapter(merged, "a")
    return {"full": full, "lorad": lorad, "lora": lora, "hook": hook, "merged": merged,
            "plain": base.requires_grad_(False)}


def _steps(mods: dict[str, nn.Module], x: torch.Tensor, gy: torch.Tensor,
           autocast: torch.dtype | None) -> dict[str, Callable[[], None]]:
    """One fwd+bwd (training methods) or one no-grad forward (merged / plain) per method."""
    def amp():
        return torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()

    def train(m: nn.Module) -> Callable[[], None]:
        def fn() -> None:
            for p in m.parameters():
                p.grad = None
            x.grad = None
            with amp():
                y = m(x)
            y.backward(gy.to(y.dtype))
        return fn

    def infer(m: nn.Module) -> Callable[[], None]:
        def fn() -> None:
            with torch.no_grad(), amp():
                m(x)
        return fn

    return {n: (infer if n in ("merged", "plain") else train)(m) for n, m in mods.items()}


def _inputs(in_f: int, out_f: int, tokens: int, batch: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, tokens, in_f, device=device, generator=g).requires_grad_()
    return x, torch.randn(batch, tokens, out_f, device=device, generator=g)


def time_shape(shape: tuple[int, int, int, int], rank: int, reps: int, device: torch.device,
               autocast: torch.dtype | None) -> dict[str, float]:
    """Median ms per method; CPU: process CPU time (robust to other jobs on a shared machine)."""
    in_f, out_f, tokens, batch = shape
    fns = _steps(build(in_f, out_f, rank, device), *_inputs(in_f, out_f, tokens, batch, device), autocast)
    if device.type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
    else:
        clock = time.process_time
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for i in range(max(reps, len(names))):
        for n in names[i % len(names):] + names[:i % len(names)]:  # interleaved, rotating order
            t0 = clock()
            fns[n]()
            times[n].append(clock() - t0)
    return {n: 1000 * statistics.median(v) for n, v in times.items()}


def memory_shape(shape: tuple[int, int, int, int], rank: int, device: torch.device,
                 autocast: torch.dtype | None, mem: "Memory") -> dict[str, float]:
    in_f, out_f, tokens, batch = shape
    mods = build(in_f, out_f, rank, device)
    x, gy = _inputs(in_f, out_f, tokens, batch, device)
    fns = _steps(mods, x, gy, autocast)
    out = {}
    for n, fn in fns.items():
        fn()  # warm-up, then clear what it left (grads) so the peak counts them again
        for p in mods[n].parameters():
            p.grad = None
        x.grad = None
        out[n] = mem.peak(fn)
    return out


def _memory_all(args: argparse.Namespace, device: torch.device, ac: torch.dtype | None) -> list[dict[str, float]]:
    mem = Memory(device)
    return [memory_shape(sh, args.rank, device, ac, mem) for sh in SHAPES]


def _memory_in_child(args: argparse.Namespace) -> list[dict[str, float]]:
    """CPU peaks from a fresh process whose glibc maps every block > 64 KiB (see the module doc)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, __file__, "--memory-json", "--threads", str(args.threads), "--rank", str(args.rank),
           "--device", "cpu"] + (["--autocast", args.autocast] if args.autocast else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--autocast", choices=["bf16", "fp16"], default=None, help="mixed precision (default fp32)")
    p.add_argument("--memory-json", action="store_true", help=argparse.SUPPRESS)  # internal: child process
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ac = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast]
    if args.memory_json:
        print(json.dumps(_memory_all(args, device, ac)))
        return
    print(f"device={device} threads={args.threads} rank={args.rank} autocast={args.autocast or 'off (fp32)'} "
          f"reps={args.reps} torch={torch.__version__}")
    head = (f"{'in->out':>10} {'tokens':>10} | {'full ms':>8} {'lorad ms':>8} {'lora ms':>8} {'hook ms':>8} | "
            f"{'lorad/full t':>12} {'lorad/full mem':>14} {'lora/lorad t':>12} {'lora/lorad mem':>14} "
            f"{'hook/lorad t':>12} {'hook/lorad mem':>14} {'merged/plain t':>14}")
    print(head)
    print("-" * len(head))
    t_start = time.perf_counter()
    times = [time_shape(sh, args.rank, args.reps, device, ac) for sh in SHAPES]  # before mallopt (see Memory)
    peaks = _memory_in_child(args) if device.type == "cpu" else _memory_all(args, device, ac)
    for (in_f, out_f, tokens, batch), t, m in zip(SHAPES, times, peaks):
        m = {k: max(v, 1e-3) for k, v in m.items()}
        print(f"{f'{in_f}->{out_f}':>10} {f'{batch}x{tokens}':>10} | {t['full']:8.1f} {t['lorad']:8.1f} "
              f"{t['lora']:8.1f} {t['hook']:8.1f} | {t['lorad'] / t['full']:12.2f} "
              f"{m['lorad'] / m['full']:14.2f} {t['lora'] / t['lorad']:12.2f} "
              f"{m['lora'] / m['lorad']:14.2f} {t['hook'] / t['lorad']:12.2f} "
              f"{m['hook'] / m['lorad']:14.2f} {t['merged'] / t['plain']:14.2f}")
        print(f"{'':>21}   peak MB: " + ", ".join(f"{k} {v:.1f}" for k, v in m.items()))
    print(f"total {time.perf_counter() - t_start:.0f} s. Targets: lorad/full t <= 1.10 and mem <= 1.00; "
          "hook/lorad t >= 1.25; merged/plain t = 1.00")


if __name__ == "__main__":
    main()
