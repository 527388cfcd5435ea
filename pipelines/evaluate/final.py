"""The end of a distillation job: its exported one-step student measured against the teacher.

Both go through the evaluation job's own protocol (``pipelines.evaluate.runs.run_evaluation``: the same
prompts, per-prompt noise, extractor and reference). The teacher's numbers depend only on the
teacher, the prompts and the sampler, so they are computed once and cached under
``<results>/runs/eval_cache/``; the student's are logged as metrics of the training run
(``final/student_*``, ``final/teacher_*``, ``final/fid_ratio_lower_better``, ``final/precision_ratio_higher_better``) with a side-by-side grid.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from wadi_core import storage
from wadi_core.images import labelled_panels
from wadi_core.models import EMBEDDED_TEACHER

from pipelines.config.job import DistillConfig
from pipelines.evaluate.config import EvaluationRun, EvaluationTracking, FinalEvaluationConfig, MetricsSpec, ModelSpec
from pipelines.tracking.client import start_run

__all__ = ["final_evaluation", "format_table", "METRICS"]

METRICS = ("fid", "precision", "recall", "alignment")


def _run(ev: FinalEvaluationConfig, model_uri: str, steps: int, guidance: float, out: str,
         tracking: EvaluationTracking) -> EvaluationRun:
    """The section's protocol applied to one model (images not kept: the grid and the numbers are)."""
    return EvaluationRun.of(ev, model=ModelSpec(uri=model_uri, steps=steps, guidance=guidance), out=out,
                            save_images="none", tracking=tracking)


def _teacher_key(cfg: DistillConfig, ev: FinalEvaluationConfig) -> str:
    """Everything the teacher's numbers depend on (not the student, not the run)."""
    teacher = str(EMBEDDED_TEACHER) if cfg.teacher == "embedded" else cfg.teacher
    if not storage.is_remote(teacher) and Path(teacher).is_dir():
        # A local folder: its denoiser's bytes, not its path (a retrained embedded teacher is a new key).
        h = hashlib.sha256()
        for f in sorted(Path(teacher).glob("*/diffusion_pytorch_model*.safetensors")):
            h.update(f.read_bytes())
        teacher = h.hexdigest()
    key = json.dumps([teacher, _protocol_of_numbers(ev)], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _protocol_of_numbers(ev: FinalEvaluationConfig) -> dict[str, Any]:
    """The settings the numbers depend on (not the resources, not the grid), by the section's
    earlier flat key names, so that a teacher cached before the section embedded the protocol is
    found again; settings that section could not change count only when changed."""
    out: dict[str, Any] = {"num_prompts": ev.num_prompts, "prompts": ev.prompts, "seed": ev.seed,
                           "teacher_steps": ev.teacher_steps, "teacher_guidance": ev.teacher_guidance,
                           "extractor": ev.metrics.extractor, "scorers": ",".join(ev.metrics.scorers),
                           "reference": ev.reference or "", "reference_images": ev.reference_images or ""}
    default, metrics_default = FinalEvaluationConfig(), MetricsSpec()
    if ev.draw_seed != default.draw_seed:
        out["draw_seed"] = ev.draw_seed
    for k in ("clip_model", "hps_model", "protocol_size", "pr_k"):
        if getattr(ev.metrics, k) != getattr(metrics_default, k):
            out[f"metrics.{k}"] = getattr(ev.metrics, k)
    return out


def _read_metrics(out: str) -> dict[str, float] | None:
    uri = storage.join(out, "metrics.json")
    try:
        return json.loads(storage.read_bytes(uri))["metrics"]
    except (OSError, KeyError, ValueError):
        return None


def teacher_metrics(cfg: DistillConfig, ev: FinalEvaluationConfig, cache_root: str,
                    tracking_uri: str | None = None) -> tuple[dict[str, float], str]:
    """The teacher's metrics at ``ev.teacher_steps`` / ``ev.teacher_guidance``: cached, else computed
    (and then logged once as an evaluation run of the training experiment)."""
    from pipelines.evaluate.runs import run_evaluation  # noqa: PLC0415 -- loads scipy (slow), only needed here

    key = _teacher_key(cfg, ev)
    out = storage.join(cache_root, f"teacher-{key}")
    cached = _read_metrics(out)
    if cached is not None:
        return cached, out
    link = EvaluationTracking(experiment=cfg.tracking.experiment, tracking_uri=tracking_uri,
                              run_name=teacher_run_name(ev, key))
    run_evaluation(_run(ev, cfg.teacher, ev.teacher_steps, ev.teacher_guidance, out, link))
    return _read_metrics(out) or {}, out


def teacher_run_name(ev: FinalEvaluationConfig, key: str) -> str:
    """The teacher's reference evaluation run: steps, guidance, prompt set and its cache key."""
    return f"teacher-{ev.teacher_steps}step-cfg{ev.teacher_guidance:g}-{ev.prompts}-{key}"


def _teacher_run_id(cfg: DistillConfig, ev: FinalEvaluationConfig, tracking_uri: str | None) -> str | None:
    """The MLflow run that holds the cached teacher numbers (logged when they were first computed)."""
    try:
        import mlflow  # noqa: PLC0415 -- MLflow is optional and slow to import

        client = mlflow.MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        name = teacher_run_name(ev, _teacher_key(cfg, ev))
        runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'", max_results=1) if exp else []
        return runs[0].info.run_id if runs else None
    except Exception:  # noqa: BLE001 - a missing link is not worth failing the evaluation
        return None


def format_table(teacher: dict[str, float], student: dict[str, float], ev: FinalEvaluationConfig) -> str:
    """A small fixed-width table: teacher (N steps, CFG w) vs student (1 step)."""
    head = f"{'':<28}" + "".join(f"{m:>11}" for m in METRICS)
    rows = [(f"teacher {ev.teacher_steps} steps CFG {ev.teacher_guidance:g}", teacher),
            ("student 1 step", student)]
    lines = [f"evaluation on {ev.num_prompts:,} prompts ({ev.prompts})", head]
    for name, m in rows:
        lines.append(f"{name:<28}" + "".join(f"{m.get(k, float('nan')):>11.3f}" for k in METRICS))
    if teacher.get("fid"):
        lines.append(f"student / teacher FID {student.get('fid', float('nan')) / teacher['fid']:.2f}x, "
                     f"precision {student.get('precision', float('nan')) / max(teacher.get('precision', 0), 1e-9):.2f}x")
    return "\n".join(lines)


def _side_by_side(left: str, right: str, labels: tuple[str, str]) -> Path | None:
    """teacher grid | student grid as one labelled PNG (same prompts and noise, tile for tile)."""
    grids = []
    for out in (left, right):
        try:
            grids.append(Image.open(storage.materialize(storage.join(out, "grid.png"))).convert("RGB"))
        except (OSError, FileNotFoundError):
            return None
    path = Path(tempfile.mkdtemp(prefix="wadi-final-")) / "teacher_vs_student.png"
    labelled_panels(list(zip(labels, grids))).save(path)
    return path


def final_evaluation(cfg: DistillConfig, export_uri: str, train_run_id: str | None, results_root: str | os.PathLike,
                     tracking_uri: str | None = None, step: int | None = None) -> dict[str, Any] | None:
    """Evaluate the exported student and the (cached) teacher; log on the training run; return the table.

    Call it once the training run is closed: the student's evaluation is an MLflow run nested
    under it, then the training run is reopened for ``final/*`` metrics and the side-by-side grid.
    The teacher's evaluation is logged once, when it is first computed.
    """
    ev = cfg.evaluation
    if not ev.num_prompts:
        return None
    from pipelines.evaluate.runs import run_evaluation  # noqa: PLC0415 -- loads scipy (slow), only needed here

    cache_root = str(Path(results_root) / "runs" / "eval_cache")
    teacher, teacher_out = teacher_metrics(cfg, ev, cache_root, tracking_uri)
    student_out = storage.join(cfg.train.storage_path, cfg.train.run_name, "final_eval")
    link = EvaluationTracking(experiment=cfg.tracking.experiment, tracking_uri=tracking_uri,
                              train_run_id=train_run_id, run_name=f"{cfg.train.run_name}-final-1step",
                              checkpoint_step=step, metrics_on_train_run=False)  # final/student_* says it once
    student = run_evaluation(_run(ev, export_uri, 1, 1.0, student_out, link))["metrics"]
    table = format_table(teacher, student, ev)
    logged = {f"final/student_{k}": float(student[k]) for k in METRICS if k in student}
    logged.update({f"final/teacher_{k}": float(teacher[k]) for k in METRICS if k in teacher})
    # Student over teacher; the name says which way is better.
    if teacher.get("fid") and "fid" in student:
        logged["final/fid_ratio_lower_better"] = float(student["fid"]) / float(teacher["fid"])
    if teacher.get("precision") and "precision" in student:
        logged["final/precision_ratio_higher_better"] = float(student["precision"]) / float(teacher["precision"])
    if train_run_id:
        with start_run(cfg.tracking.experiment, tracking_uri=tracking_uri, run_id=train_run_id) as tracker:
            tracker.log_metrics(logged, step=step)
            teacher_run = _teacher_run_id(cfg, ev, tracking_uri)
            if teacher_run:  # the reference run these final/teacher_* numbers come from
                tracker.set_tags({"wadi.teacher_eval_run_id": teacher_run})
            grid = _side_by_side(teacher_out, student_out, (
                f"teacher: {ev.teacher_steps} steps, CFG {ev.teacher_guidance:g}", "student: 1 step"))
            if grid is not None:
                tracker.log_artifact(grid, "final_eval")
    return {"teacher": teacher, "student": student, "metrics": logged, "table": table,
            "teacher_out": teacher_out, "student_out": student_out}
