"""Image generation for evaluation: prompt sources, a seeded sampler, and Ray Data actors.

Every prompt has a stable key; its initial noise comes from a CPU ``torch.Generator`` seeded
with a hash of ``(seed, key)``, so the images do not depend on the batch size, the number of
workers or the device. Models: a diffusers directory (the teacher with N steps and CFG, or an
exported one-step student), a teacher plus a WaDi adapter file (training checkpoints), from a
local path, ``s3://`` or an MLflow URI (``models:/...``, ``runs:/...``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from wadi_core import storage
from wadi_core.adapters import load_adapter, set_adapter
from wadi_core.domain import eval_prompts
from wadi_core.export import one_step_scheduler
from wadi_core.models import Cond, load_teacher, resolve_teacher_dir

from pipelines.evaluate.config import ModelSpec

__all__ = [
    "PromptRecord",
    "load_prompts",
    "prompt_seed",
    "resolve_model_dir",
    "ImageGenerator",
    "apply_student_adapter",
    "GeneratorActor",
    "write_png_files",
    "encode_png",
    "generation_dataset",
    "image_path",
]

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


# ---------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PromptRecord:
    """One prompt: ``idx`` within its group (file name), ``key`` (seed), ``group`` (HPS style or "")."""

    idx: int
    key: str
    prompt: str
    group: str = ""


def prompt_seed(seed: int, key: str) -> int:
    """63-bit seed from ``(seed, key)``: independent of batching, workers and devices."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _records(prompts: list[str], prefix: str, group: str = "") -> list[PromptRecord]:
    return [PromptRecord(i, f"{prefix}-{i:06d}", p, group) for i, p in enumerate(prompts)]


def load_prompts(source: str, num: int | None = None, draw_seed: int = 2024) -> tuple[list[PromptRecord], dict]:
    """Prompt records and a description (name, sha256 of the list) for a prompt source.

    Sources: ``coco30k`` (the canonical list, see ``wadi_core.metrics.coco.default_coco30k_path``),
    ``domain[:N[:SEED[:SPLIT]]]`` (the embedded domain's eval prompts), ``hpsv2:DIR`` (anime/concept-art/paintings/photo
    JSON arrays), a COCO ``captions_*.json`` (one caption per image, seeded draw), a ``.json``
    array of strings, or a ``.txt`` list (one per line). ``num`` keeps the first N (per group).
    """
    from wadi_core.metrics import coco  # noqa: PLC0415 -- loads scipy (slow), only needed here

    info: dict[str, Any] = {"source": source}
    if source == "coco30k":
        path = coco.default_coco30k_path()
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: pass --prompts PATH to your copy of the COCO-30k list")
        prompts = coco.read_prompt_list(path, coco.COCO30K_SHA256)
        records = _records(prompts, "coco30k")
    elif source == "domain" or source.startswith("domain:"):
        parts = source.split(":")[1:]
        n = int(parts[0]) if parts and parts[0] else (num or 5000)
        seed = int(parts[1]) if len(parts) > 1 else 1
        split = parts[2] if len(parts) > 2 else "train"
        records = _records(eval_prompts(n, seed, split), f"domain-{split}-{seed}")
        info.update(domain_n=n, domain_seed=seed, domain_split=split)
    elif source.startswith("hpsv2:"):
        root = source[len("hpsv2:"):]
        records = []
        for style in HPS_STYLES:
            items = json.loads(storage.read_bytes(storage.join(root, f"{style}.json")))
            records += _records([str(p) for p in items][:num], f"hpsv2-{style}", style)
    elif source.endswith(".txt"):
        records = _records(coco.read_prompt_list(source), Path(source).stem)
    elif source.endswith(".json"):
        doc = json.loads(storage.read_bytes(source))
        if isinstance(doc, dict) and "annotations" in doc:
            drawn = coco.draw_coco_captions(source, num, draw_seed)
            records = [PromptRecord(i, f"coco-{p.image_id}", p.caption) for i, p in enumerate(drawn)]
            info.update(draw_seed=draw_seed)
        elif isinstance(doc, list):
            records = _records([str(p) for p in doc], Path(source).stem)
        else:
            raise ValueError(f"{source}: expected a COCO captions JSON or a JSON array of prompts")
    else:
        raise ValueError(f"unknown prompt source {source!r}: use coco30k, domain[:N:SEED:SPLIT], hpsv2:DIR, "
                         "a COCO captions .json, a .json array or a .txt list")
    if num is not None and not source.startswith("hpsv2:"):
        records = records[:num]
    if not records:
        raise ValueError(f"prompt source {source!r} gave no prompts")
    info.update(num_prompts=len(records), sha256=coco.prompt_list_sha256([r.prompt for r in records]))
    return records, info


def image_path(root: str, record: dict[str, Any] | PromptRecord) -> str:
    """``<root>/<group>/{idx:05d}.png`` (the HPSv2 benchmark layout; group "" -> ``images``)."""
    rec = asdict(record) if isinstance(record, PromptRecord) else record
    return storage.join(root, rec["group"] or "images", f"{int(rec['idx']):05d}.png")


# ---------------------------------------------------------------------------------- models
def _find_pipeline_dir(root: Path) -> Path:
    found = sorted(root.rglob("model_index.json"), key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"no diffusers pipeline (model_index.json) under {root}")
    return found[0].parent


def resolve_model_dir(uri: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Local diffusers directory for a local path, ``s3://``, "embedded" or an MLflow URI."""
    if uri.startswith(("models:/", "runs:/", "mlflow-artifacts:")):
        import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

        key = hashlib.sha256(uri.encode()).hexdigest()[:16]
        cache = Path(cache_dir or storage.default_cache_dir()) / "mlflow" / key
        if not cache.exists() or not any(cache.rglob("model_index.json")):
            cache.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(cache))
        return _find_pipeline_dir(cache)

    root = resolve_teacher_dir(uri, cache_dir)
    return root if (root / "model_index.json").exists() else _find_pipeline_dir(root)


def apply_student_adapter(teacher: Any, uri: str) -> float | None:
    """Load a student adapter file (``wadi_core.adapters`` format; local, s3://, runs:/ or models:/)
    onto the teacher's denoiser and make it active. Returns the ``a`` of the student's one-step
    parametrisation when the file records it (the export's ``adapters/student.safetensors`` does)."""
    if uri.startswith(("runs:/", "models:/")):
        import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    else:
        local = storage.materialize(uri)
    meta = load_adapter(teacher.denoiser, "student", local)
    set_adapter(teacher.denoiser, "student")
    teacher.freeze()
    return float(meta["student_alphabar"]) if "student_alphabar" in meta else None


class ImageGenerator:
    """Loads a model once and samples uint8 images for (prompt, key) pairs."""

    def __init__(self, spec: ModelSpec, seed: int = 0, device: str | None = None):
        from diffusers import DDIMScheduler  # noqa: PLC0415 -- diffusers models: seconds to import

        self.spec, self.seed = spec, seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        root = resolve_model_dir(spec.uri)
        self.teacher = load_teacher(root, dtype=getattr(torch, spec.dtype), device=self.device)
        # A flow-matching teacher (SD3-style) samples with its own Euler scheduler (wadi_core.models.flow.sample_flow):
        # a DDIM made from its config would use the wrong schedule, and 1 step from sigma = 1 is x0 = z - v.
        self.flow = self.teacher.prediction_type == "flow"
        scheduler = self.teacher.scheduler
        if spec.adapter:
            student_alphabar = apply_student_adapter(self.teacher, spec.adapter)
            if self.flow:
                student_alphabar = None
            if student_alphabar is not None:  # the student's own x0 = (z - sqrt(1 - a) eps) / sqrt(a)
                scheduler = one_step_scheduler(scheduler, student_alphabar)
        final_alpha_one = True if spec.final_x0 else bool(self.teacher.scheduler.config.get("set_alpha_to_one", False))
        # predict_eps returns eps (v-prediction already converted): the sampler must not convert again.
        self.scheduler = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing",
                                                   set_alpha_to_one=final_alpha_one, prediction_type="epsilon")
        self.scheduler.set_timesteps(spec.steps, device=self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], keys: list[str]) -> np.ndarray:
        """uint8 images (B, H, W, 3) for ``prompts``; noise seeded per key."""
        t = self.teacher
        shape = t.latent_shape
        noise = torch.stack([
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(prompt_seed(self.seed, k)))
            for k in keys
        ])
        if self.flow:
            from wadi_core.models.flow import sample_flow  # noqa: PLC0415 -- diffusers' scheduler: only flow teachers need it

            images = t.decode(sample_flow(t, list(prompts), noise.to(self.device), self.spec.steps, self.spec.guidance))
            return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        latents = (noise * self.scheduler.init_noise_sigma).to(self.device, t.dtype)
        cond = t.encode_prompts(list(prompts))
        cfg = self.spec.guidance != 1.0
        if cfg:
            both = Cond.cat([t.null_cond(len(prompts)), cond])
        for step_t in self.scheduler.timesteps:
            if cfg:
                eps_u, eps_c = t.predict_eps(torch.cat([latents, latents]), step_t, both).chunk(2)
                eps = eps_u + self.spec.guidance * (eps_c - eps_u)  # classifier-free guidance
            else:
                eps = t.predict_eps(latents, step_t, cond)
            latents = self.scheduler.step(eps, step_t, latents, eta=0.0).prev_sample
        images = t.decode(latents)
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------- Ray Data
class GeneratorActor:
    """Ray Data callable class: loads the model once per actor, adds an ``image`` column."""

    def __init__(self, spec: dict[str, Any], seed: int = 0, device: str | None = None):
        self.generator = ImageGenerator(ModelSpec(**spec), seed, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        images = self.generator.generate([str(p) for p in batch["prompt"]], keys)
        return {**batch, "seed": np.array([prompt_seed(self.generator.seed, k) for k in keys], dtype=np.int64),
                "image": images}


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_png_files(batch: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """Ray Data function: write each image to ``<root>/<group>/{idx:05d}.png``; rows pass through."""
    for i in range(len(batch["key"])):
        rec = {"group": str(batch["group"][i]), "idx": int(batch["idx"][i])}
        storage.write_bytes(image_path(root, rec), encode_png(batch["image"][i]))
    return batch


def generation_dataset(records: list[PromptRecord], spec: ModelSpec, seed: int = 0, *, concurrency: int = 1,
                       batch_size: int = 16, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0,
                       accelerator_type: str | None = None,
                       num_blocks: int | None = None) -> Any:
    """Lazy Ray dataset of prompts -> generated images (columns idx, key, prompt, group, seed, image)."""
    import ray.data  # noqa: PLC0415 -- Ray only on the cluster path

    rows = [asdict(r) for r in records]
    ds = ray.data.from_items(rows, override_num_blocks=num_blocks or max(1, min(len(rows) // batch_size, 256)))
    return ds.map_batches(
        GeneratorActor, fn_constructor_kwargs={"spec": asdict(spec), "seed": seed},
        compute=ray.data.ActorPoolStrategy(size=concurrency), batch_size=batch_size, num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor, accelerator_type=accelerator_type if gpus_per_actor else None, batch_format="numpy",
    )


def iter_rows_sorted(ds: Any) -> Iterator[dict[str, Any]]:
    """Rows of a (small) dataset sorted by group and idx (for deterministic outputs in tests)."""
    rows = ds.take_all()
    yield from sorted(rows, key=lambda r: (r["group"], int(r["idx"])))
