"""LoRA exports of a LoRaD student vs the exact student, on the embedded domain (docs/EXPORT.md).

    python jobs/distill_local.py threads=1 steps=300 out_dir=runs/h16_student
    python benchmarks/bench_lora_export.py --export runs/h16_student/export --ranks 4,16,64,full --n 1000

For each rank: ``jobs/export.py format=lora`` writes the file; the stock teacher + that file
(``load_lora_weights``, the export's scheduler) samples the domain's eval prompts in one step with
the same seeds as the exact student; reported: domain FID / precision / recall vs real renders,
alignment, mean |image difference| to the exact student, relative weight error, file size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

from wadi_core.domain import eval_prompts
from wadi_core.domain.data import make_render_set
from wadi_core.domain.evaluator import load_domain_evaluator
from wadi_core.domain.quality import REAL_SEED, alignment_report
from wadi_core.domain.teacher import sample_images
from wadi_core.metrics import GaussianStats, frechet_distance
from wadi_core.metrics.precision_recall import precision_recall
from wadi_core.models import resolve_teacher_dir

from jobs import export as export_job

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True)
    ap.add_argument("--teacher", default="embedded")
    ap.add_argument("--ranks", default="4,16,64,full")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--n-real", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    evaluator = load_domain_evaluator()
    real = make_render_set(args.n_real, REAL_SEED, "train")
    real_x = torch.from_numpy(real.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        real_f = torch.cat([evaluator.features(real_x[i:i + 500]) for i in range(0, len(real_x), 500)])
    real_stats = GaussianStats.from_features(real_f.double().numpy())
    prompts = eval_prompts(args.n, seed=1, split="train")

    def measure(pipe) -> tuple[dict, torch.Tensor]:
        t0 = time.time()
        images = sample_images(pipe, prompts, steps=1, guidance=1.0, seed=1, batch=250)
        with torch.no_grad():
            fake_f = torch.cat([evaluator.features(images[i:i + 500]) for i in range(0, len(images), 500)])
        rep = alignment_report(evaluator, images, prompts)
        rep["fid"] = float(frechet_distance(GaussianStats.from_features(fake_f.double().numpy()), real_stats))
        rep.update(precision_recall(real_f, fake_f, k=3))
        rep["sample_seconds"] = time.time() - t0
        return rep, images

    teacher_dir = resolve_teacher_dir(args.teacher)
    rows = {}
    exact, exact_images = measure(StableDiffusionPipeline.from_pretrained(args.export))
    rows["exact LoRaD student (merged export)"] = exact
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks.split(","):
            path = Path(tmp) / f"lora_{rank}.safetensors"
            export_job.main([f"model={args.export}", f"teacher={args.teacher}", "format=lora",
                             f"lora_rank={rank}", f"out={path}"])
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            fits = json.loads(meta["wadi.fits"])
            pipe = StableDiffusionPipeline.from_pretrained(teacher_dir)
            pipe.load_lora_weights(str(path))
            pipe.scheduler = DDIMScheduler.from_config(json.loads(meta["wadi.scheduler_config"]))
            rep, images = measure(pipe)
            rep["image_mae_vs_exact"] = float((images - exact_images).abs().mean())
            d2 = sum(f["delta_norm"] ** 2 for f in fits)
            rep["relative_weight_error"] = (sum(f["tail_norm"] ** 2 for f in fits) / d2) ** 0.5
            rep["file_mb"] = path.stat().st_size / 2**20
            rep["max_layer_rank"] = max(f["rank"] for f in fits)
            rows[f"LoRA r={rank}"] = rep
    adapter = Path(args.export) / "adapters" / "student.safetensors"
    rows["exact LoRaD student (merged export)"]["file_mb"] = adapter.stat().st_size / 2**20
    out = {"n": args.n, "n_real": args.n_real, "export": args.export, "rows": rows}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
