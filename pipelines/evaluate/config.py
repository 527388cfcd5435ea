"""The evaluation's configuration: one protocol (``EvaluationConfig``), the run that applies it to a
model (``EvaluationRun``, what ``jobs/evaluate.py`` runs) and the distillation job's closing
evaluation (``FinalEvaluationConfig``, the ``evaluation:`` section of a recipe).

Plain dataclasses with no heavy imports: the job configs embed them and ``--print-config`` must
not wait for scipy or diffusers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from wadi_core.config import ConfigError
from wadi_core.domain import TEACHER_GUIDANCE, TEACHER_STEPS

from pipelines.runtime.cluster import check_accelerator_type

__all__ = ["ModelSpec", "MetricsSpec", "fid_features", "RayResources", "EvaluationTracking", "EvaluationConfig",
           "EvaluationRun", "FinalEvaluationConfig"]


@dataclass(frozen=True)
class ModelSpec:
    """What to sample from and how.

    ``uri``: diffusers pipeline directory (local, ``s3://``, ``models:/``, ``runs:/``, or
    "embedded"); ``adapter``: optional WaDi adapter ``.safetensors`` (a training checkpoint's
    student) applied on top. ``steps`` DDIM steps with "trailing" spacing (1 step = t 999);
    ``guidance`` classifier-free guidance (1 = off). The last step returns the x0 prediction
    (``final_x0``), which for one step is exactly the WaDi generator.
    """

    uri: str = "embedded"  # diffusers pipeline dir, s3:// prefix, models:/ or runs:/ URI, or "embedded"
    adapter: str | None = None  # a WaDi adapter .safetensors (a checkpoint's student) applied on top
    steps: int = 1  # DDIM steps, "trailing" spacing (1 step = t 999)
    guidance: float = 1.0  # classifier-free guidance scale (1 = off)
    dtype: str = "float32"  # float32 | float16 | bfloat16
    final_x0: bool = True  # the last step returns the x0 prediction (one step: exactly the generator)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")


@dataclass(frozen=True)
class MetricsSpec:
    """Which metrics to compute and with which models (weights from local paths or s3://)."""

    extractor: str = "domain"  # FID / precision-recall features: domain | inception:URI | thumbnail | none | import:m:f
    scorers: tuple[str, ...] = ("domain",)  # per-image scorers: domain, clip:URI, hps:URI ...
    clip_model: str = "ViT-g-14"  # open_clip architecture of a clip: scorer
    hps_model: str = "ViT-H-14"  # open_clip architecture of an hps: scorer
    protocol_size: int = 0  # 256 = COCO protocol (center crop + LANCZOS); 0 = images as generated
    pr_k: int = 3  # k of the k-NN precision / recall
    device: str | None = None  # feature device (None: cuda if available, else cpu)

    def describe(self) -> dict[str, Any]:
        """The settings that apply (no CLIP model name for an evaluation without a CLIP scorer), and
        which features the FID / precision / recall were computed on (``fid.features``)."""
        kinds = {s.split(":", 1)[0] for s in self.scorers}
        unused = {"clip_model"} - ({"clip_model"} if "clip" in kinds else set())
        unused |= {"hps_model"} - ({"hps_model"} if "hps" in kinds else set())
        out = {f"metrics.{k}": (",".join(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
               if k not in unused}
        out["fid.features"] = fid_features(self.extractor)
        return out


def fid_features(extractor: str) -> str:
    """What "fid" means for an extractor: the standard Inception pool3 FID, or a Frechet distance on
    another network's features (the embedded domain's classifier), which is not comparable to it."""
    kind = extractor.split(":", 1)[0]
    return {"inception": "Inception-v3 pool3 (2048-d): the standard FID",
            "domain": "the embedded domain classifier's features: a Frechet distance within this domain, "
                      "not comparable to Inception FID"}.get(kind, f"{extractor} features")


@dataclass(frozen=True)
class RayResources:
    """Actors per stage and their resources. Fractional CPUs leave room for Ray Data's own tasks
    (PNG writing, statistics): whole CPUs for every actor on a small node hang the pipeline.

    Generation and feature (metric) actors stream at the same time, so their GPUs add up:
    ``metric_gpus_per_actor`` (None = ``gpus_per_actor``) lets the light feature extractors share
    a GPU (e.g. 0.5) so that both stages fit a pod. ``accelerator_type`` (Ray's GPU model name,
    "" = any) keeps GPU actors on that kind of node."""

    gen_workers: int = 1  # image-generation actors
    metric_workers: int = 1  # feature / metric actors
    batch_size: int = 32  # images per actor call
    cpus_per_actor: float = 0.5  # fractional: leaves CPUs for Ray Data's own tasks
    gpus_per_actor: float = 0.0  # GPUs of one generation actor (a fraction of one GPU, or whole GPUs)
    metric_gpus_per_actor: float | None = None  # GPUs of one feature actor (None: gpus_per_actor; e.g. 0.5 to share)
    accelerator_type: str = ""  # Ray GPU model of the GPU actors (A100, H100, L4 ...; "" = any)

    def __post_init__(self) -> None:
        if self.gen_workers < 1 or self.metric_workers < 1 or self.batch_size < 1:
            raise ValueError("gen_workers, metric_workers and batch_size must be >= 1")
        for name, gpus in (("ray.gpus_per_actor", self.gpus_per_actor),
                           ("ray.metric_gpus_per_actor", self.metric_gpus)):
            if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
                raise ValueError(f"{name}={gpus:g}: use a fraction of one GPU (0 < x <= 1) or a whole number "
                                 "(Ray packs fractional actors onto one GPU)")
        check_accelerator_type(self.accelerator_type, max(self.gpus_per_actor, self.metric_gpus),
                               "ray.accelerator_type", "ray.gpus_per_actor")

    @property
    def metric_gpus(self) -> float:
        """GPUs of one feature (metric) actor."""
        return self.gpus_per_actor if self.metric_gpus_per_actor is None else self.metric_gpus_per_actor

    def accelerator_for(self, gpus: float) -> str | None:
        """The accelerator type for an actor with ``gpus`` GPUs (None for CPU actors)."""
        return self.accelerator_type or None if gpus > 0 else None


@dataclass(frozen=True)
class EvaluationTracking:
    """Where an evaluation run is logged in MLflow and which training run / checkpoint it measures."""

    experiment: str = "wadi-eval"  # MLflow experiment (a linked training run's experiment wins)
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/runs/mlflow.db (as distill)
    run_name: str | None = None  # None: <model>-<steps>step-cfg<guidance>-<prompts>-<time>
    train_run_id: str | None = None  # MLflow training run: the eval run nests under it, metrics also land there
    checkpoint_id: str | None = None  # the evaluated checkpoint (tag wadi.checkpoint_id; set by the schedule)
    checkpoint_source: str | None = None  # where the checkpoint lives (tag wadi.checkpoint_source)
    checkpoint_step: int | None = None  # training step of the checkpoint (step of eval/* on the training run)
    # Headline metrics also as eval/<metric> on the training run (a checkpoint's evaluation); the
    # job's closing evaluation logs its own final/* there instead, so it turns this off.
    metrics_on_train_run: bool = True


@dataclass(frozen=True)
class EvaluationConfig:
    """The protocol: which prompts, which noise, which metrics against which reference, on what resources."""

    prompts: str = "domain:5000:1:train"  # prompt set: domain:N:SEED:SPLIT, coco30k, hpsv2:DIR, COCO captions JSON, .json or .txt list
    num_prompts: int | None = None  # keep the first N prompts of the set, per group (None: all)
    draw_seed: int = 2024  # seed of the one-caption-per-image draw from a COCO captions JSON
    seed: int = 0  # per-prompt noise seed (the same image noise for every model)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    reference: str | None = "outputs/eval/reference/domain-5000-777-train"  # stored reference statistics
    reference_images: str | None = "domain:5000:777:train"  # real images to build the reference from if missing
    grid: int = 32  # images in the logged sample grid
    ray: RayResources = field(default_factory=RayResources)


@dataclass(frozen=True)
class EvaluationRun(EvaluationConfig):
    """The protocol applied to one model: what ``pipelines.evaluate.runs.run_evaluation`` runs."""

    model: ModelSpec = field(default_factory=ModelSpec)
    out: str = "outputs/eval/run"  # output folder or s3:// prefix (metrics.json, grid.png, images/)
    save_images: Literal["files", "none"] = "files"  # "files": every image as a PNG under <out>/images/
    tracking: EvaluationTracking = field(default_factory=EvaluationTracking)

    @classmethod
    def of(cls, protocol: EvaluationConfig, **run: Any) -> EvaluationRun:
        """``protocol`` (its ``EvaluationConfig`` fields) with the run's ``model``, ``out``, ... set."""
        return cls(**{f.name: getattr(protocol, f.name) for f in fields(EvaluationConfig)}, **run)


@dataclass(frozen=True)
class FinalEvaluationConfig(EvaluationConfig):
    """The exported student against the teacher at the end of a distillation job (``pipelines.evaluate.final``).

    Same protocol as ``jobs/evaluate.py run``; the teacher's numbers are computed once and cached.
    ``num_prompts: 0`` turns it off (the paper recipes: COCO needs your Inception weights there).
    """

    num_prompts: int = 0  # prompts to evaluate on (0: no closing evaluation)
    prompts: str = "domain:1000:1:train"  # prompt set (pipelines.evaluate.generation.load_prompts)
    ray: RayResources = field(default_factory=lambda: RayResources(batch_size=64))
    teacher_steps: int = TEACHER_STEPS  # the teacher's sampling steps
    teacher_guidance: float = TEACHER_GUIDANCE  # the teacher's classifier-free guidance scale

    def __post_init__(self) -> None:
        if self.num_prompts < 0 or self.teacher_steps < 1 or self.teacher_guidance < 0:
            raise ConfigError("evaluation: need num_prompts >= 0 (0: off), teacher_steps >= 1 and "
                              "teacher_guidance >= 0")


#: Keys of the distillation job's ``evaluation:`` section before it embedded the evaluation protocol.
MOVED_KEYS = {"extractor": "metrics.extractor", "scorers": "metrics.scorers", "gen_workers": "ray.gen_workers",
              "batch_size": "ray.batch_size", "cpus_per_actor": "ray.cpus_per_actor",
              "gpus_per_actor": "ray.gpus_per_actor", "accelerator_type": "ray.accelerator_type"}
