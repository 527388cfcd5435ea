"""Pretrain the embedded teacher (VAE, then text encoder + UNet) and save it as a diffusers pipeline.

    python jobs/pretrain_teacher.py --out wadi_core/assets/embedded_teacher

Seeded and resumable: rerun the same command to resume from ``--state-dir``. Logs params,
losses and a PNG sample grid to MLflow (``MLFLOW_TRACKING_URI`` or ./mlruns/mlflow.db).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.tracking import start_run  # noqa: E402
from wadi_core.config import to_flat_dict  # noqa: E402
from wadi_core.domain.pretrain import GRID_PROMPTS, PretrainConfig, pretrain_teacher  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = PretrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "wadi_core/assets/embedded_teacher"), help="pipeline output dir")
    p.add_argument("--state-dir", default=str(REPO / "runs/pretrain_teacher/state"), help="resume state dir")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-images", type=int, default=d.num_images)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-decoder-steps", type=int, default=d.vae_decoder_steps)
    p.add_argument("--denoiser-steps", type=int, default=d.denoiser_steps)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--threads", type=int, default=d.num_threads)
    p.add_argument("--denoiser-workers", type=int, default=d.denoiser_workers,
                   help="data-parallel processes (gloo) for the denoiser phase")
    p.add_argument("--unet-channels", type=int, nargs="+", default=list(d.arch.unet_channels),
                   help="UNet block widths; each extra block halves the 8x8 latent once more")
    p.add_argument("--experiment", default="embedded-teacher")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--grid", default=None, help="also write the sample grid PNG here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    d = PretrainConfig()
    cfg = dataclasses.replace(
        d, seed=args.seed, num_images=args.num_images, vae_steps=args.vae_steps,
        vae_decoder_steps=args.vae_decoder_steps, denoiser_steps=args.denoiser_steps,
        checkpoint_every=args.checkpoint_every, num_threads=args.threads, denoiser_workers=args.denoiser_workers,
        arch=dataclasses.replace(d.arch, unet_channels=tuple(args.unet_channels)),
    )
    with start_run(args.experiment, run_name=f"pretrain-seed{cfg.seed}", tracking_uri=args.tracking_uri,
                   params=to_flat_dict(cfg)) as tracker:
        summary = pretrain_teacher(cfg, args.out, args.state_dir, log=tracker.log_metrics)
        tracker.log_metrics(summary)
        from diffusers import StableDiffusionPipeline

        from wadi_core.domain.teacher import folder_size_mb, image_grid, sample_images

        pipe = StableDiffusionPipeline.from_pretrained(args.out)
        prompts = [p for p in GRID_PROMPTS for _ in range(6)]
        grid = image_grid(sample_images(pipe, prompts, steps=25, guidance=3.0, seed=0), nrow=len(GRID_PROMPTS))
        grid_path = Path(args.grid or Path(args.state_dir).parent / "teacher_grid.png")
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(grid_path)
        tracker.log_artifact(grid_path)
        size = folder_size_mb(args.out)
        tracker.log_metrics({"pipeline_mb": size})
        print(f"saved {args.out} ({size:.1f} MB), wall {summary['wall_time_s'] / 60:.1f} min, "
              f"vae scaling_factor {summary['scaling_factor']:.4f}, grid {grid_path}")


if __name__ == "__main__":
    main()
