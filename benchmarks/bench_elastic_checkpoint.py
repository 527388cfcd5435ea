"""Checkpoints that resume at another world size, at SD 1.5 adapter size: three ways, measured in one run.

    python benchmarks/bench_elastic_checkpoint.py                 # written by 2 ranks, loaded by 1
    python benchmarks/bench_elastic_checkpoint.py --scale 0.1     # quick check (a tenth of the parameters)

The student's and the fake score's LoRaD adapters at SD 1.5 size (83.80 M + 9.38 M fp32 parameters,
``docs/RESULTS.md``), each in its own DeepSpeed engine with torch AdamW as the trainer builds them
(``pipelines.train.engines.build_engine``), one step taken, then written by ``--write-world`` gloo ranks
and loaded by ``--read-world`` ranks (the resize of an elastic run), three ways:

* ``universal``: ZeRO-2 engines, DeepSpeed's partitioned checkpoint, ``ds_to_universal`` (a subprocess,
  one worker) and ``checkpoint.load_universal``; the loader unpickles (``torch.load(weights_only=False)``);
* ``zero0``: ZeRO-0 engines (every rank holds the whole AdamW state), DeepSpeed's checkpoint, which
  loads at any world size as it is; unpickles too;
* ``full_state``: ZeRO-2 engines, ``pipelines.train.portable_state`` (full fp32 adapters and Adam
  moments gathered into one safetensors file per role; no conversion, no unpickling).

Printed per way: the AdamW state each rank holds while training, seconds to write (collective, all
ranks), to convert, to load at the new world size, bytes on disk, the peak extra resident memory of
one rank while writing / loading (``VmHWM`` reset through ``/proc/self/clear_refs``), and whether the
loaded parameters and moments equal the written ones bit for bit (a digest of every tensor).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from proc_memory import reset_peak_rss, status_bytes
from wadi_core.vsd.config import VSDConfig
from wadi_core.vsd.optim import make_optimizer

from pipelines.config.job import TrainConfig
from pipelines.train.engines import build_engine, deepspeed_config, init_distributed
from pipelines.train.portable_state import gather_full_state, load_full_state, save_full_state

# SD 1.5 LoRaD adapter sizes of the sd15 recipe (docs/RESULTS.md, dry run): student, fake score
ADAPTER_PARAMS = {"student": 83_800_000, "fake": 9_380_000}
ROW = 1024  # parameters are stored as (rows, 1024) blocks of at most 1 M entries, as LoRaD's per-layer tensors
TAG = "state"
WAYS = ("universal", "zero0", "full_state")


class _Adapters(nn.Module):
    """Trainable fp32 tensors totalling ``total`` entries (the shape of one role's adapters)."""

    def __init__(self, total: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        sizes, left = [], total
        while left > 0:
            rows = min(1024, -(-left // ROW))
            sizes.append(rows)
            left -= rows * ROW
        self.blocks = nn.ParameterList(nn.Parameter(torch.randn(r, ROW, generator=g) * 0.01) for r in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((b * x).square().mean() for b in self.blocks)


def _peak_extra(rss_before: int) -> int:
    return status_bytes("VmHWM") - rss_before


def _digest(engines: dict[str, Any]) -> str:
    """sha256 over every parameter and Adam moment (full, gathered), in a fixed order. Collective."""
    h = hashlib.sha256()
    for role in sorted(engines):
        tensors, step = gather_full_state(engines[role])
        h.update(f"{role}:{step}".encode())
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


def _engines(way: str, world: int, scale: float, universal_load: bool = False) -> dict[str, Any]:
    zero = 0 if way == "zero0" else 2
    train = TrainConfig(global_batch=world, num_workers=world, zero_stage=zero)
    out = {}
    for i, (role, n) in enumerate(ADAPTER_PARAMS.items()):
        module = _Adapters(int(n * scale), seed=i)
        if universal_load:  # build_engine's config plus DeepSpeed's universal-checkpoint switch
            vsd = VSDConfig()
            params = list(module.parameters())
            cfg = deepspeed_config(train, vsd) | {"checkpoint": {"load_universal": True}}
            engine, *_ = deepspeed.initialize(model=module, config=cfg, dist_init_required=False,
                                              optimizer=make_optimizer(params, "adamw", 1e-4, (0.9, 0.999), 0.0))
        else:
            engine = build_engine(module, 1e-4, train, VSDConfig())
        out[role] = engine
    return out


def _optimizer_bytes(engine: Any) -> int:
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _rank_main(rank: int, world: int, port: int, phase: str, way: str, scale: float, work: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    init_distributed()
    result: dict[str, Any] = {}
    try:
        folder = Path(work) / way
        if phase == "write":
            engines = _engines(way, world, scale)
            x = torch.full((1,), 1.0 + rank)
            for engine in engines.values():
                engine.backward(engine(x))
                engine.step()
            result["optimizer_bytes_per_rank"] = sum(_optimizer_bytes(e) for e in engines.values())
            result["digest"] = _digest(engines)
            dist.barrier()
            rss = reset_peak_rss()
            t0 = time.perf_counter()
            for role, engine in engines.items():
                if way == "full_state":
                    save_full_state(engine, folder / f"{role}.safetensors", rank)
                else:
                    client = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
                    engine.save_checkpoint(str(folder / role), tag=TAG, client_state=client)
            dist.barrier()
            result["write_s"] = time.perf_counter() - t0
            result["write_peak_extra_bytes"] = _peak_extra(rss)
        else:
            engines = _engines(way, world, scale, universal_load=way == "universal")
            dist.barrier()
            rss = reset_peak_rss()
            t0 = time.perf_counter()
            for role, engine in engines.items():
                if way == "full_state":
                    load_full_state(engine, folder / f"{role}.safetensors")
                else:
                    tag = f"{TAG}_universal" if way == "universal" else TAG
                    path, _ = engine.load_checkpoint(str(folder / role), tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=False)
                    assert path is not None, f"{way}: nothing loaded from {folder / role}"
            dist.barrier()
            result["load_s"] = time.perf_counter() - t0
            result["load_peak_extra_bytes"] = _peak_extra(rss)
            result["digest"] = _digest(engines)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, phase: str, way: str, scale: float, work: Path) -> dict[str, Any]:
    out = work / f"{phase}-{way}.json"
    mp.start_processes(_rank_main, args=(world, _free_port(), phase, way, scale, str(work), str(out)),
                       nprocs=world, start_method="spawn", join=True)
    return json.loads(out.read_text())


def _convert(folder: Path) -> float:
    """``ds_to_universal`` on each role's checkpoint (one extract and one merge worker); seconds."""
    t0 = time.perf_counter()
    for role in ADAPTER_PARAMS:
        src = folder / role / TAG
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
               "--output_folder", str(folder / role / f"{TAG}_universal"), "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"ds_to_universal failed on {src}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def _bytes(folder: Path, universal_only: bool = False) -> int:
    files = [f for f in folder.rglob("*") if f.is_file()]
    if universal_only:
        files = [f for f in files if f"{TAG}_universal" in f.parts]
    return sum(f.stat().st_size for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-world", type=int, default=2)
    ap.add_argument("--read-world", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the SD 1.5 adapter sizes")
    ap.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="elastic-ckpt-"))
    rows = {}
    try:
        for way in args.ways:
            print(f"[{way}] writing with {args.write_world} ranks ...", flush=True)
            row = _run(args.write_world, "write", way, args.scale, work)
            written = row.pop("digest")
            row["convert_s"] = _convert(work / way) if way == "universal" else 0.0
            row["disk_bytes"] = _bytes(work / way)
            print(f"[{way}] loading with {args.read_world} rank(s) ...", flush=True)
            loaded = _run(args.read_world, "read", way, args.scale, work)
            row["bit_equal"] = loaded.pop("digest") == written
            row.update(loaded)
            rows[way] = row
            shutil.rmtree(work / way, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = sum(ADAPTER_PARAMS.values()) * args.scale
    print(f"\n{n / 1e6:.2f} M fp32 adapter parameters (student + fake), written by {args.write_world} ranks, "
          f"loaded by {args.read_world}")
    print(f"{'way':<11} {'AdamW/rank':>10} {'write s':>8} {'convert s':>9} {'load s':>7} {'disk':>8} "
          f"{'write +RSS':>10} {'load +RSS':>9}  bit-equal")
    gb = 1024 ** 3
    for way, r in rows.items():
        print(f"{way:<11} {r['optimizer_bytes_per_rank'] / gb:>8.2f}GB {r['write_s']:>8.1f} {r['convert_s']:>9.1f} "
              f"{r['load_s']:>7.1f} {r['disk_bytes'] / gb:>6.2f}GB {r['write_peak_extra_bytes'] / gb:>8.2f}GB "
              f"{r['load_peak_extra_bytes'] / gb:>7.2f}GB  {'yes' if r['bit_equal'] else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"params": n, "write_world": args.write_world,
                                         "read_world": args.read_world, "ways": rows}, indent=2))


if __name__ == "__main__":
    main()
