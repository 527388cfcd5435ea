"""Pretrain the embedded teacher (VAE, then text encoder + UNet) and save it as a diffusers pipeline.

The shipped teacher is made in two runs (20 + 11 min on 2 cores): an eps-prediction teacher from
scratch, then fine-tuned into v-prediction (SD 2.1's parametrisation; docs/history/QUALITY.md says why):

    python jobs/pretrain_teacher.py out=runs/teacher_eps/pipeline state_dir=runs/teacher_eps/state
    python jobs/pretrain_teacher.py init_from=runs/teacher_eps/pipeline prediction_type=v_prediction \
        denoiser_steps=1000 denoiser_lr=5e-4 out=wadi_core/assets/embedded_teacher state_dir=runs/teacher_v/state
    python jobs/pretrain_teacher.py --print-config                      # every key (PretrainConfig + outputs)

Seeded and resumable: rerun the same command to resume from ``state_dir``. Logs params,
losses and a PNG sample grid to MLflow (``MLFLOW_TRACKING_URI`` or ./mlruns/mlflow.db).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from wadi_core.config import base_part, to_flat_dict
from wadi_core.domain.pretrain import GRID_PROMPTS, PretrainConfig, pretrain_teacher
from wadi_core.domain.teacher import folder_size_mb, sample_images
from wadi_core.images import image_grid

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.tracking.client import start_run


@dataclass(frozen=True)
class PretrainJob(PretrainConfig):
    """The pretraining (``PretrainConfig``) plus where its outputs go."""

    out: str = str(REPO / "wadi_core/assets/embedded_teacher")   # pipeline output dir
    state_dir: str = str(REPO / "runs/pretrain_teacher/state")   # resume state
    experiment: str = "embedded-teacher"  # MLflow experiment
    tracking_uri: str = ""  # MLflow tracking URI ("": MLFLOW_TRACKING_URI, else sqlite ./mlflow.db)
    grid: str = ""                   # also write the sample grid PNG here

    def pretraining(self) -> PretrainConfig:
        return base_part(self, PretrainConfig)


def _grid_images(out: str, prompts: list[str], prediction_type: str):
    """The sample grid's images: the diffusers pipeline, or for a flow teacher (which diffusers' SD
    pipeline cannot step) the same Euler sampler on its FlowMatchEulerDiscreteScheduler."""
    if prediction_type != "flow":
        from diffusers import StableDiffusionPipeline  # noqa: PLC0415 -- diffusers models: seconds to import

        return sample_images(StableDiffusionPipeline.from_pretrained(out), prompts, seed=0)
    import torch  # noqa: PLC0415 -- torch only here: --help stays fast

    from wadi_core.domain import TEACHER_GUIDANCE, TEACHER_STEPS  # noqa: PLC0415 -- only the flow grid needs it
    from wadi_core.models import load_teacher  # noqa: PLC0415 -- diffusers models: seconds to import
    from wadi_core.models.flow import sample_flow  # noqa: PLC0415 -- diffusers models: seconds to import

    teacher = load_teacher(out)
    z = torch.randn(len(prompts), *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    return teacher.decode(sample_flow(teacher, prompts, z, TEACHER_STEPS, TEACHER_GUIDANCE))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    args = config_from_args(PretrainJob, p.parse_intermixed_args(argv))
    cfg = args.pretraining()
    with start_run(args.experiment, run_name=f"pretrain-seed{cfg.seed}", tracking_uri=args.tracking_uri or None,
                   params=to_flat_dict(cfg)) as tracker:
        summary = pretrain_teacher(cfg, args.out, args.state_dir, log=tracker.log_metrics)
        tracker.log_metrics(summary)
        prompts = [p for p in GRID_PROMPTS for _ in range(6)]
        grid = image_grid(_grid_images(args.out, prompts, cfg.prediction_type), rows=len(GRID_PROMPTS))
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
