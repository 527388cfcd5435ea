"""Full-size rehearsal on CPU: the real distillation job on a random-weight teacher of the real
SD 1.5 / SD 2.1-base / PixArt-alpha / SDXL base 1.0 / SD3-medium architecture, and
(``--throughput``) student vs teacher images/s at SD 1.5 shapes.

    python benchmarks/full_size.py --arch sd15 --scale 0.25 --latent 16     # quick check first
    flock /tmp/heavy.lock nice -n 5 python benchmarks/full_size.py --arch sd15 --throughput
    flock /tmp/heavy.lock nice -n 5 python benchmarks/full_size.py --arch sdxl --zero 2 --latent 16 --depth 2
    flock /tmp/heavy.lock nice -n 5 python benchmarks/full_size.py --arch sd3 --zero 2 --latent 16 --depth 12

SDXL's 2.57 B UNet and SD3-medium's 2.03 B transformer are too big for two fp32 workers plus the
fp32 merged copy the export makes in 24 GiB: ``--depth`` cuts their deep stack (real widths, every
other component real size), ``--latent`` the image size; what ran is in docs/RESULTS.md.

Rehearsal, per ZeRO stage (2, then 3): the teacher (``benchmarks/full_size_models.py``, configs in
``benchmarks/configs/<arch>/``) is written as a diffusers folder, then ``jobs/distill.py`` runs
the paper recipe with only what this machine needs overridden: 2 Ray workers, batch 1 per worker,
3 steps, a checkpoint every 2 steps, fp32 (``vsd.mixed_precision=fp16`` needs GPUs; ``--precision`` keeps
PixArt's bf16), student EMA off under ZeRO-3 (refused with it), a local prompt lake and local
storage; the text encoders of the recipes that use ``data.text_encoding: actors`` (PixArt's T5,
SDXL's two CLIPs, SD3's CLIP-L, CLIP-G and T5) stay in their own Ray Data actor, on CPU. ``--set
key=value`` adds recipe overrides (what a machine cannot hold, stated with the results). After the checkpoint at step 2 this script SIGKILLs one train worker: Ray Train restarts
the group, which resumes from step 2, finishes step 3 and exports. The export is then loaded with
``DiffusionPipeline.from_pretrained`` and samples 1 step at the recipe resolution.

Printed per stage: every train worker process's peak RSS (kernel VmHWM, polled; first attempt
and restarted group), the step times (MLflow ``perf/step_seconds``), checkpoint and export sizes,
the export's 1-step sample time. Results go to ``<out>/<arch>/results.json``; checkpoints, export
and MLflow artifacts are deleted afterwards (``--keep`` keeps them).

Throughput (``--throughput``): the teacher pipeline (25 steps, CFG: a batch of 2 per step) vs the
exported student (1 step, no CFG), both including the text encoder and the VAE decode, batch 1,
on the same machine in one run; the UNet, text encoder and VAE decoder are timed separately so
the ratio can be explained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch
from full_size_models import ARCHS, RECIPES, write_teacher  # noqa: E402

from wadi_core.prompts import write_prompt_shards

from pipelines.config.job import load_config

GIB = 2**30
CHECKPOINT_EVERY = 2  # the worker is killed after this checkpoint; the group resumes from it


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _proc_memory(pid: int) -> dict[str, int]:
    """VmHWM (the kernel's peak RSS) and the current PSS: RSS counts the teacher's weights that
    the workers map from the same safetensors files once per worker; PSS splits them."""
    out = {}
    try:
        for name, keys in (("status", ("VmHWM",)), ("smaps_rollup", ("Pss",))):
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in keys:
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class WorkerWatch(threading.Thread):
    """Polls the job's process tree: peak RSS (and polled peak PSS) of every Ray Train worker
    process; kills one worker (SIGKILL, once) as soon as the checkpoint ``kill_after`` is complete
    in storage. Ray starts workers 15 nice levels below their raylet (19 here); they are put back
    at this script's niceness so that the step times are not set by every other process."""

    def __init__(self, root_pid: int, kill_after: Path | None, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root_pid, self.kill_after, self.interval = root_pid, kill_after, interval
        self.peaks: dict[int, int] = {}  # pid -> peak RSS bytes, in order of appearance
        self.pss_peaks: dict[int, int] = {}
        self.encoder_pids: set[int] = set()
        self.niceness = os.getpriority(os.PRIO_PROCESS, 0)
        self.killed: tuple[int, float] | None = None
        self.stop = threading.Event()

    def workers(self) -> list[int]:
        import psutil  # noqa: PLC0415 -- the optional [system-metrics] extra

        try:
            procs = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            return []
        found = []
        for p in procs:
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "RayTrainWorker" in cmd:
                found.append(p.pid)
            elif "TextEncoderActor" in cmd:  # data.text_encoding=actors: the encoder's own process
                self.encoder_pids.add(p.pid)
        return found

    def run(self) -> None:
        while not self.stop.is_set():
            pids = self.workers()
            for pid in pids + sorted(self.encoder_pids):
                mem = _proc_memory(pid)
                if "VmHWM" in mem:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), mem["VmHWM"])
                    self.pss_peaks[pid] = max(self.pss_peaks.get(pid, 0), mem.get("Pss", 0))
                try:
                    if os.getpriority(os.PRIO_PROCESS, pid) > self.niceness:
                        os.setpriority(os.PRIO_PROCESS, pid, self.niceness)
                except OSError:
                    pass
            if self.kill_after is not None and self.killed is None and self.kill_after.exists() and pids:
                victim = sorted(pids)[-1]
                os.kill(victim, signal.SIGKILL)
                self.killed = (victim, time.time())
                print(f"[full_size] SIGKILL train worker pid {victim} after {self.kill_after.parent.name}",
                      flush=True)
            self.stop.wait(self.interval)


def _prompt_lake(path: Path, n: int = 64) -> Path:
    if not (path / "manifest.json").exists():
        subjects = ("a red fox", "a lighthouse", "a bowl of ramen", "an old tram", "a snowy forest",
                    "a robot reading", "a glass teapot", "a mountain lake")
        styles = ("at dawn, photograph", "oil painting", "watercolor", "studio lighting, 35mm",
                  "isometric illustration", "in the rain, cinematic", "pencil sketch", "low poly render")
        samples = [(f"{i:09d}", f"{subjects[i % 8]}, {styles[(i // 8) % 8]}", {}) for i in range(n)]
        write_prompt_shards(samples, str(path), shard_size=16)
    return path


def _overrides(arch: str, zero: int, teacher: Path, lake: Path, work: Path, precision: str, steps: int,
               extra: list[str] = ()) -> list[str]:
    """The paper recipe, with only what 2 CPU workers on this machine need changed (then ``extra``)."""
    ov = {
        "teacher": teacher, "data.prompts": lake, "data.epochs": 1, "data.max_steps": steps, "data.num_prompts": 0,
        "train.run_name": f"{arch}-zero{zero}", "train.num_workers": 2, "train.global_batch": 2,
        "train.cpus_per_worker": 0.5, "train.gpus_per_worker": 0, "train.zero_stage": zero,
        "train.checkpoint_every": CHECKPOINT_EVERY, "train.keep": 2, "train.max_failures": 1,
        "train.storage_path": work / "ray", "train.log_every": 1,
        "vsd.mixed_precision": f"'{precision}'",  # quoted: YAML reads a bare no as false
        "tracking.uri": f"sqlite:///{work / f'mlflow-zero{zero}.db'}", "tracking.sample_every": 0,
        "tracking.num_sample_prompts": 1, "evaluation.num_prompts": 0,
    }
    if zero == 3:
        ov["vsd.student_ema"] = 0  # ZeRO-3 partitions the student: the EMA is refused with it

    if load_config(RECIPES[arch]).data.text_encoding == "actors":  # PixArt: T5 in its own Ray Data actor
        # On CPU: 2 x 0.25 (workers) + 0.5 (encoder actor) of 2 CPUs leaves Ray Data 1 to read with.
        ov.update({"train.cpus_per_worker": 0.25, "data.encoder_actors": 1, "data.encoder_gpus_per_actor": 0,
                   "data.encoder_cpus_per_actor": 0.5, "data.encoder_batch_size": 8})
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write key=value, e.g. --set vsd.student.rank=64")
        ov[key] = value
    return [f"{k}={v}" for k, v in ov.items()]


def _mlflow_metrics(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

    client = mlflow.MlflowClient(tracking_uri)
    out = {}
    for key in ("perf/step_seconds", "perf/data_wait_s", "perf/data_wait_share", "resume/from_step",
                "distill/loss_gen", "distill/loss_fake"):
        out[key] = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    return out


def _sample(export: Path, prompt: str) -> dict[str, Any]:
    """``DiffusionPipeline.from_pretrained(export)``: 1 step at the recipe resolution."""
    from diffusers import DiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(export)
    load_s = time.perf_counter() - t0
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer  # SD / SDXL: unet; PixArt / SD3: transformer
    side = 8 * int(denoiser.config.sample_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0, height=side, width=side,
                     generator=torch.Generator().manual_seed(0)).images[0]
    sample_s = time.perf_counter() - t0
    image.save(export.parent / "sample_1step.png")
    del pipe
    return {"load_s": load_s, "sample_s": sample_s, "size": list(image.size),
            "pipeline": json.loads((export / "model_index.json").read_text())["_class_name"]}


def rehearse(arch: str, zero: int, teacher: Path, lake: Path, work: Path, precision: str,
             steps: int, extra: list[str] = ()) -> dict[str, Any]:
    """One ``jobs/distill.py`` run (fresh run name) with a worker killed after the first checkpoint."""
    run_name = f"{arch}-zero{zero}"
    run_dir = work / "ray" / run_name
    shutil.rmtree(run_dir, ignore_errors=True)
    (work / f"mlflow-zero{zero}.db").unlink(missing_ok=True)  # a fresh MLflow run, not a resumed one
    cmd = [sys.executable, str(REPO / "jobs" / "distill.py"), "--config", RECIPES[arch], "--json",
           *_overrides(arch, zero, teacher, lake, work, precision, steps, extra)]
    log = work / f"{run_name}.log"
    print(f"[full_size] {arch} ZeRO-{zero}: {' '.join(cmd[1:])}\n[full_size] log: {log}", flush=True)
    started = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=REPO)
        watch = WorkerWatch(proc.pid, run_dir / f"checkpoint_{CHECKPOINT_EVERY:08d}" / "COMPLETE")
        watch.start()
        stdout, _ = proc.communicate()
        watch.stop.set()
        watch.join()
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"jobs/distill.py failed (exit {proc.returncode}) for {arch} ZeRO-{zero}: see {log}")
    result = json.loads(stdout.strip().splitlines()[-1])
    metrics = _mlflow_metrics(result["tracking_uri"], result["mlflow_run_id"])
    checkpoints = {p.name: _tree_bytes(p) for p in sorted(run_dir.glob("checkpoint_*"))}
    export = Path(result["export_uri"])
    export_bytes = _tree_bytes(export)
    sample = _sample(export, "a lighthouse at dawn, photograph")
    pids = [p for p in watch.peaks if p not in watch.encoder_pids]
    out = {
        "arch": arch, "zero_stage": zero, "precision": precision, "overrides": list(extra), "wall_s": wall,
        "worker_peak_rss_gib": {str(pid): round(b / GIB, 2) for pid, b in watch.peaks.items()},
        "first_group_peak_rss_gib": [round(watch.peaks[p] / GIB, 2) for p in pids[:2]],
        "restarted_group_peak_rss_gib": [round(watch.peaks[p] / GIB, 2) for p in pids[2:]],
        "first_group_peak_pss_gib": [round(watch.pss_peaks[p] / GIB, 2) for p in pids[:2]],
        "restarted_group_peak_pss_gib": [round(watch.pss_peaks[p] / GIB, 2) for p in pids[2:]],
        "encoder_actor_peak_rss_gib": [round(watch.peaks[p] / GIB, 2) for p in sorted(watch.encoder_pids)
                                       if p in watch.peaks],
        "killed_pid": watch.killed[0] if watch.killed else None,
        "resumed_from_step": [v for _, v in metrics["resume/from_step"]],
        "step_seconds": [(s, round(v, 1)) for s, v in metrics["perf/step_seconds"]],
        # how long each step waited for its prompts (``next_batch``), and that wait over the step
        "data_wait_s": [(s, round(v, 4)) for s, v in metrics["perf/data_wait_s"]],
        "data_wait_share": [(s, v) for s, v in metrics["perf/data_wait_share"]],
        "loss_gen": [(s, v) for s, v in metrics["distill/loss_gen"]],
        "checkpoint_bytes": checkpoints, "export_bytes": export_bytes, "export_uri": str(export),
        "sample": sample, "mlflow_run_id": result["mlflow_run_id"], "log": str(log),
    }
    if watch.killed is None:
        raise RuntimeError(f"no worker was killed for {arch} ZeRO-{zero}: the checkpoint at step "
                           f"{CHECKPOINT_EVERY} never completed (see {log})")
    if out["resumed_from_step"] != [CHECKPOINT_EVERY]:
        raise RuntimeError(f"{arch} ZeRO-{zero}: expected one resume from step {CHECKPOINT_EVERY}, "
                           f"MLflow has {out['resumed_from_step']} (see {log})")
    return out


def _share(r: dict[str, Any]) -> str:
    """The data wait's share of step time over the steps after the first of each group (the first
    step of a group also starts the Ray Data pipeline), as a percentage."""
    firsts = {1, *(s + 1 for s in r["resumed_from_step"])}
    waits = [v for s, v in r.get("data_wait_share", []) if s not in firsts]
    return f"{100 * max(waits):.3f} % (max of {len(waits)} steps)" if waits else "n/a"


def _format(r: dict[str, Any]) -> str:
    steps = ", ".join(f"{v:.0f}" for _, v in r["step_seconds"])
    ck = max(r["checkpoint_bytes"].values(), default=0)
    return (f"{r['arch']:7s} ZeRO-{r['zero_stage']} {r['precision']:4s} | worker peak RSS "
            f"{r['first_group_peak_rss_gib']} GiB (restarted group {r['restarted_group_peak_rss_gib']}), PSS "
            f"{r.get('first_group_peak_pss_gib')} ({r.get('restarted_group_peak_pss_gib')})"
            + (f", encoder actor {r['encoder_actor_peak_rss_gib']} GiB" if r.get("encoder_actor_peak_rss_gib") else "")
            + " | "
            f"step s [{steps}] | data wait {_share(r)} | resumed from {r['resumed_from_step']} | checkpoint {ck / GIB:.2f} GiB | "
            f"export {r['export_bytes'] / GIB:.2f} GiB | 1-step sample {r['sample']['size'][0]} px "
            f"{r['sample']['sample_s']:.1f} s | wall {r['wall_s'] / 60:.1f} min")


class _Timer:
    """Wall time and calls of a module's forward (hooks), to split a pipeline's time."""

    def __init__(self, module: Any):
        self.seconds, self.calls, self.batch, self._t = 0.0, 0, 0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module: Any, args: Any) -> None:
        self._t = time.perf_counter()
        if args and hasattr(args[0], "shape"):
            self.batch += int(args[0].shape[0])

    def _post(self, module: Any, args: Any, out: Any) -> None:
        self.seconds += time.perf_counter() - self._t
        self.calls += 1


def _time_pipeline(pipe: Any, steps: int, guidance: float, n: int, prompt: str) -> dict[str, Any]:
    timers = {"unet": _Timer(pipe.unet), "text_encoder": _Timer(pipe.text_encoder),
              "vae_decoder": _Timer(pipe.vae.decoder)}
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(i))
    total = time.perf_counter() - t0
    return {"images": n, "seconds": total, "images_per_s": n / total,
            **{f"{k}_s_per_image": v.seconds / n for k, v in timers.items()},
            "unet_calls_per_image": timers["unet"].calls / n, "unet_images_per_image": timers["unet"].batch / n}


def component_times(teacher: Path, teacher_steps: int, repeats: int = 3) -> dict[str, Any]:
    """Best of ``repeats`` interleaved timings of each stage at SD 1.5 shapes (text encoder for 1
    and 2 prompts, UNet pass on 1 and 2 latents, VAE decode): on a machine shared with other jobs
    the two end-to-end pipelines run minutes apart under different loads, so the ratio is also
    computed from these (student = TE(1) + UNet(1) + VAE; teacher = TE(2) + calls x UNet(2) + VAE)."""
    from diffusers import DiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    pipe = DiffusionPipeline.from_pretrained(teacher)
    side = int(pipe.unet.config.sample_size)
    calls = len(pipe.scheduler.set_timesteps(teacher_steps) or pipe.scheduler.timesteps)
    ids = pipe.tokenizer(["a red fox"] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids
    dim = pipe.text_encoder.config.hidden_size
    stages = {
        "text_encoder_1": lambda: pipe.text_encoder(ids[:1]),
        "text_encoder_2": lambda: pipe.text_encoder(ids),
        "unet_1": lambda: pipe.unet(torch.randn(1, 4, side, side), 999, torch.randn(1, 77, dim)),
        "unet_2": lambda: pipe.unet(torch.randn(2, 4, side, side), 999, torch.randn(2, 77, dim)),
        "vae_decode_1": lambda: pipe.vae.decode(torch.randn(1, 4, side, side)),
    }
    best = {k: float("inf") for k in stages}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in stages.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    student = best["text_encoder_1"] + best["unet_1"] + best["vae_decode_1"]
    teacher_s = best["text_encoder_2"] + calls * best["unet_2"] + best["vae_decode_1"]
    return {"best_seconds": best, "teacher_unet_calls": calls, "student_s": student, "teacher_s": teacher_s,
            "ratio": teacher_s / student, "ratio_unet_only": calls * best["unet_2"] / best["unet_1"]}


def throughput(teacher: Path, student: Path, teacher_steps: int, guidance: float, student_images: int,
               threads: int) -> dict[str, Any]:
    """Teacher (``teacher_steps``, CFG) vs the one-step student, images/s, same process and threads."""
    from diffusers import DiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    torch.set_num_threads(threads)
    prompt = "a red fox in a snowy forest at dawn, photograph"
    out: dict[str, Any] = {"threads": threads, "teacher_steps": teacher_steps, "guidance": guidance}
    pipe = DiffusionPipeline.from_pretrained(student)
    pipe.set_progress_bar_config(disable=True)
    _time_pipeline(pipe, 1, 1.0, 1, prompt)  # warm-up (allocator, oneDNN kernels)
    out["student"] = _time_pipeline(pipe, 1, 1.0, student_images, prompt)
    del pipe
    pipe = DiffusionPipeline.from_pretrained(teacher)
    print(f"[full_size] teacher: {teacher_steps} steps with CFG (a few minutes on CPU) ...", flush=True)
    out["teacher"] = _time_pipeline(pipe, teacher_steps, guidance, 1, prompt)
    s, t = out["student"], out["teacher"]
    out["ratio"] = s["images_per_s"] / t["images_per_s"]
    # The same pipelines without text encoder and VAE decode: the ceiling set by UNet passes alone.
    out["ratio_unet_only"] = t["unet_s_per_image"] / s["unet_s_per_image"]
    del pipe
    out["components"] = component_times(teacher, teacher_steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCHS, required=True)
    ap.add_argument("--scale", type=float, default=1.0, help="width factor (< 1: a quick check, not the real size)")
    ap.add_argument("--latent", type=int, default=0,
                    help="latent side (0: the architecture's own: 64 sd15 / sd21, 32 pixart, 128 sdxl / sd3)")
    ap.add_argument("--depth", type=int, default=0,
                    help="cut the denoiser's deep stack to this many layers (sdxl: of 10 per block, sd3: of 24 "
                         "blocks), widths kept real: for what 24 GiB cannot hold (0: the real depth)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="another recipe override (repeatable), e.g. vsd.student.rank=64")
    ap.add_argument("--zero", type=int, nargs="+", default=[2, 3], help="ZeRO stages to rehearse, in order")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="", help="vsd.mixed_precision (default: no; bf16 for pixart)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "full_size")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints, exports and MLflow artifacts")
    ap.add_argument("--throughput", action="store_true", help="also student vs teacher images/s (sd15 shapes)")
    ap.add_argument("--skip-rehearsal", action="store_true", help="throughput only (needs a kept export)")
    ap.add_argument("--teacher-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--student-images", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the throughput run")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tag = args.arch + (f"-s{args.scale:g}" if args.scale != 1 else "") + (f"-l{args.latent}" if args.latent else "")
    tag += f"-d{args.depth}" if args.depth else ""
    work = (args.out / tag).resolve()
    teacher = work / "teacher"
    if args.build_only:
        write_teacher(args.arch, teacher, args.scale, args.latent or None, depth=args.depth or None)
        return
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # In a child process: building ~1.5 B random parameters leaves nothing behind in this one.
    subprocess.run([sys.executable, __file__, "--build-only", *sys.argv[1:]], check=True)
    print(f"[full_size] teacher {teacher} ({_tree_bytes(teacher) / GIB:.2f} GiB, {time.time() - t0:.0f} s)", flush=True)
    lake = _prompt_lake(work / "lake")
    precision = args.precision or ("bf16" if args.arch == "pixart" else "no")
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    last_export = None
    for zero in ([] if args.skip_rehearsal else args.zero):
        r = rehearse(args.arch, zero, teacher, lake, work, precision, args.steps, args.overrides)
        r.update(scale=args.scale, latent=args.latent or None, depth=args.depth or None)  # what was shrunk
        results[f"zero{zero}"] = r
        results_file.write_text(json.dumps(results, indent=2))
        print("[full_size] " + _format(r), flush=True)
        if last_export is not None and not args.keep:
            shutil.rmtree(last_export, ignore_errors=True)
        last_export = Path(r["export_uri"])
        if not args.keep:  # ~1-5 GB per run; the export is kept for the next step (throughput)
            for ck in (work / "ray" / f"{args.arch}-zero{zero}").glob("checkpoint_*"):
                shutil.rmtree(ck, ignore_errors=True)
            shutil.rmtree(work / "mlartifacts", ignore_errors=True)
    if args.throughput:
        if args.arch != "sd15":
            print("[full_size] note: the throughput target is stated at SD 1.5 shapes", flush=True)
        student = last_export or Path(results.get(f"zero{args.zero[-1]}", {}).get("export_uri", ""))
        if not (student / "model_index.json").exists():
            raise SystemExit(f"no exported student at {student}: run the rehearsal (or keep its export) first")
        r = throughput(teacher, student, args.teacher_steps, args.guidance, args.student_images, args.threads)
        results["throughput"] = r
        results_file.write_text(json.dumps(results, indent=2))
        s, t = r["student"], r["teacher"]
        for name, x in (("student 1 step", s), (f"teacher {args.teacher_steps} steps CFG", t)):
            print(f"[full_size] {name}: {x['images_per_s']:.4f} images/s | per image: text encoder "
                  f"{x['text_encoder_s_per_image']:.2f} s, UNet {x['unet_s_per_image']:.1f} s "
                  f"({x['unet_calls_per_image']:.0f} calls, {x['unet_images_per_image']:.0f} latents), "
                  f"VAE decode {x['vae_decoder_s_per_image']:.2f} s", flush=True)
        print(f"[full_size] throughput ratio student / teacher = {r['ratio']:.1f}x "
              f"(UNet passes alone: {r['ratio_unet_only']:.1f}x)", flush=True)
        c = r["components"]
        print("[full_size] best-of-3 stage times: " + ", ".join(f"{k} {v:.2f} s" for k, v in c["best_seconds"].items())
              + f"; teacher {c['teacher_unet_calls']} UNet calls -> student {c['student_s']:.1f} s/image, teacher "
              f"{c['teacher_s']:.1f} s/image: ratio {c['ratio']:.1f}x (UNet alone {c['ratio_unet_only']:.1f}x)",
              flush=True)
    if last_export is not None and not args.keep:
        shutil.rmtree(last_export, ignore_errors=True)
    print(f"[full_size] results: {results_file}")


if __name__ == "__main__":
    main()
