"""Export a distilled student as a diffusers folder, one Stable Diffusion (LDM) file, or a LoRA.

    # SRC: an export folder (wadi_core.export.export_one_step_pipeline: pipeline + adapters/ +
    # wadi_export.json), a models:/ or runs:/ MLflow URI of one, or a training checkpoint
    # (a folder holding adapters/student.safetensors, or the .safetensors file itself).
    python jobs/export.py model=runs/distill/export format=single-file out=student.safetensors
    python jobs/export.py model=models:/wadi-embedded@latest format=lora lora_rank=64 out=student_lora.safetensors
    python jobs/export.py model=runs/ray/wadi-embedded/checkpoint_00000120 teacher=embedded \\
        format=diffusers out=student_pipeline

Loading what it writes (docs/EXPORT.md):
    StableDiffusionPipeline.from_single_file("student.safetensors", config="<the export folder>")
    pipe = StableDiffusionPipeline.from_pretrained(<teacher>); pipe.load_lora_weights("student_lora.safetensors")
    pipe.scheduler = DDIMScheduler.from_config(<metadata "wadi.scheduler_config" of the LoRA file>)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from wadi_core import storage
from wadi_core.config import from_dict, unflatten

from pipelines.config.cli import add_config_arguments, config_from_args, read_recipe

ADAPTER = Path("adapters") / "student.safetensors"


@dataclass(frozen=True)
class Source:
    """A resolved SRC: a diffusers export (``pipeline``) and/or a student adapter file on a teacher."""

    pipeline: Path | None
    adapter: Path | None
    teacher: str | None


def _download(uri: str) -> Path:
    import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="wadi-src-")))


def resolve_source(model: str, teacher: str | None) -> Source:
    """Local folder / file, ``s3://`` or MLflow URI -> :class:`Source` (downloads remote ones)."""
    if model.startswith(("models:/", "runs:/", "mlflow-artifacts:")):
        local = _download(model)
    elif storage.is_remote(model):
        local = storage.materialize(model)
    else:
        local = Path(model)
    if not local.exists():
        raise SystemExit(f"--model {model}: {local} does not exist")
    if local.is_file():
        if local.suffix != ".safetensors":
            raise SystemExit(f"--model {model}: expected a folder or a student adapter .safetensors file")
        return Source(None, local, teacher)
    indexes = sorted(local.rglob("model_index.json"), key=lambda p: len(p.parts))
    if indexes:
        root = indexes[0].parent
        info_file = root / "wadi_export.json"
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        adapter = root / ADAPTER
        return Source(root, adapter if adapter.exists() else None, teacher or info.get("teacher"))
    adapters = sorted(local.rglob("student.safetensors"), key=lambda p: len(p.parts))
    if adapters:
        return Source(None, adapters[0], teacher)
    raise SystemExit(f"--model {model}: no diffusers export (model_index.json) and no adapters/student.safetensors "
                     "under it: pass an export folder, a training checkpoint or an MLflow model URI")


def _teacher_uri(src: Source, recipe_teacher: str) -> str:
    return src.teacher or recipe_teacher


def _load_teacher(uri: str):
    from wadi_core.models import load_teacher  # noqa: PLC0415 -- torch only here: --help stays fast

    try:
        return load_teacher(uri)
    except (FileNotFoundError, OSError, ValueError) as e:
        raise SystemExit(f"cannot load the teacher {uri!r} ({e}): pass --teacher DIR|s3://...|embedded, the "
                         "teacher the student was distilled from") from e


def _vsd_config(recipe: str, student_spec):
    from wadi_core.vsd import VSDConfig  # noqa: PLC0415 -- torch only here: --help stays fast

    _, data = read_recipe(recipe)
    cfg = from_dict(VSDConfig, unflatten(dict(data.get("vsd") or {})))
    return replace(cfg, student=student_spec), data.get("teacher", "embedded")


def diffusers_export(src: Source, out: Path, recipe: str) -> Path:
    """The source as a one-step diffusers export at ``out`` (copied, or built from a checkpoint)."""
    if src.pipeline is not None:
        if out.resolve() != src.pipeline.resolve():
            shutil.copytree(src.pipeline, out, dirs_exist_ok=True)
        return out
    from wadi_core.adapters import load_adapter_file  # noqa: PLC0415 -- torch only here: --help stays fast
    from wadi_core.export import export_one_step_pipeline  # noqa: PLC0415 -- torch only here: --help stays fast

    state, spec = load_adapter_file(src.adapter)
    cfg, recipe_teacher = _vsd_config(recipe, spec)
    teacher = _load_teacher(_teacher_uri(src, recipe_teacher))
    return export_one_step_pipeline(teacher, out, cfg=cfg, student_state=state)


def lora_export(src: Source, out: Path, rank: int | None, recipe: str, dtype) -> dict:
    """LoRA factors of the student's weight change on its teacher; returns a small report."""
    from wadi_core.adapters import load_adapter_file  # noqa: PLC0415 -- torch only here: --help stays fast
    from wadi_core.export_formats import (lora_from_deltas,  # noqa: PLC0415 -- torch only here: --help stays fast
                                          lorad_weight_deltas, save_lora_file)

    if src.adapter is None:
        raise SystemExit("a LoRA needs the student adapter (adapters/student.safetensors): this source has only "
                         "merged weights")
    state, spec = load_adapter_file(src.adapter)
    if spec.kind != "lorad":
        raise SystemExit(f"the student adapter is {spec.kind!r}; --format lora converts LoRaD students")
    _, recipe_teacher = _vsd_config(recipe, spec)
    teacher = _load_teacher(_teacher_uri(src, recipe_teacher))
    if teacher.family != "sd":
        raise SystemExit("--format lora writes UNet LoRAs (StableDiffusionPipeline.load_lora_weights); "
                         f"this teacher is {teacher.family!r}: use --format diffusers")
    with tempfile.TemporaryDirectory(prefix="wadi-export-") as tmp:
        pipe_dir = src.pipeline or diffusers_export(src, Path(tmp) / "export", recipe)
        scheduler = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
        deltas = lorad_weight_deltas(teacher, spec, state)
        lora, fits = lora_from_deltas(deltas, rank, dtype=dtype)
        save_lora_file(out, lora, fits, scheduler,
                       {"teacher": teacher.source, "student_kind": spec.kind, "student_rank": spec.rank,
                        "lora_rank": rank or "full"})
    delta2 = sum(f.delta_norm ** 2 for f in fits)
    tail2 = sum(f.tail_norm ** 2 for f in fits)
    return {"layers": len(fits), "rank": rank or "full", "bytes": out.stat().st_size,
            "relative_weight_error": (tail2 / delta2) ** 0.5 if delta2 else 0.0}


@dataclass(frozen=True)
class ExportJob:
    """``jobs/export.py``'s configuration (``model``, ``format`` and ``out`` are required)."""

    model: str                      # export folder, models:/ or runs:/ URI, or training checkpoint
    format: Literal["diffusers", "single-file", "lora"]  # diffusers (pipeline folder), single-file (one .safetensors) or lora (adapter as LoRA)
    out: str                        # output folder (diffusers) or .safetensors file
    lora_rank: str = "64"           # LoRA rank per layer, or "full" (exact)
    teacher: str = ""               # teacher of a checkpoint; default: the export's wadi_export.json, else the recipe's
    recipe: str = "embedded"        # recipe of the run a checkpoint comes from (its vsd settings)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # weights of single-file / LoRA outputs
    text_encoder_layout: Literal["auto", "clip", "openclip"] = "auto"  # single-file: SD1.x CLIP or SD2.x OpenCLIP keys

    def __post_init__(self) -> None:
        if self.lora_rank != "full" and not (self.lora_rank.isdigit() and int(self.lora_rank) > 0):
            raise ValueError(f"lora_rank must be a positive integer or 'full', got {self.lora_rank!r}")
        if self.format != "diffusers" and not self.out.endswith(".safetensors"):
            raise ValueError(f"out={self.out}: format={self.format} writes one .safetensors file")


def main(argv: list[str] | None = None) -> int:
    import torch  # noqa: PLC0415 -- torch only here: --help stays fast

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap)
    args = config_from_args(ExportJob, ap.parse_intermixed_args(argv))
    dtype = getattr(torch, args.dtype)
    src = resolve_source(args.model, args.teacher or None)
    out = Path(args.out)
    if args.format == "diffusers":
        result = {"out": str(diffusers_export(src, out, args.recipe))}
    elif args.format == "single-file":
        from wadi_core.export_formats import save_single_file  # noqa: PLC0415 -- torch only here: --help stays fast

        with tempfile.TemporaryDirectory(prefix="wadi-export-") as tmp:
            pipe_dir = src.pipeline or diffusers_export(src, Path(tmp) / "export", args.recipe)
            save_single_file(pipe_dir, out, text_layout=args.text_encoder_layout, dtype=dtype)
            pipeline_class = json.loads((Path(pipe_dir) / "model_index.json").read_text())["_class_name"]
        result = {"out": str(out), "bytes": out.stat().st_size,
                  "load_with": f"{pipeline_class}.from_single_file({str(out)!r}, config=<diffusers export dir>)"}
    else:
        rank = None if args.lora_rank == "full" else int(args.lora_rank)
        result = {"out": str(out), **lora_export(src, out, rank, args.recipe, dtype)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
