"""The plan of a job, built without weights: world size, steps, trainable parameters per role."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from wadi_core.adapters import apply_adapter, count_trainable
from wadi_core.models import build_denoiser_on_meta, denoiser_config, family_of_config
from wadi_core.redact import redact

from pipelines.config.job import DistillConfig

__all__ = ["Plan", "build_plan"]


@dataclass(frozen=True)
class Plan:
    recipe: str
    teacher: str
    family: str
    world_size: int
    per_worker_batch: int
    global_batch: int
    num_prompts: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    epochs: int
    trainable: dict[str, int]  # role -> trainable parameters
    layer_sets: dict[str, str]  # role -> adapter kind, rank and layer set (preset or regex)
    base_params: int
    resources_per_worker: dict[str, float]
    zero_stage: int
    storage: str

    def format(self) -> str:
        def n(v: int | None) -> str:
            return "unknown (no manifest.json; set data.num_prompts)" if v is None else f"{v:,}"

        lines = [
            f"recipe            {self.recipe}",
            f"teacher           {self.teacher} ({self.family})",
            f"world size        {self.world_size} workers x {self.resources_per_worker}",
            f"batch             {self.global_batch} global = {self.per_worker_batch} per worker",
            f"prompts           {n(self.num_prompts)}",
            f"steps per epoch   {n(self.steps_per_epoch)}",
            f"total steps       {n(self.total_steps)} ({self.epochs} epoch(s))",
            f"DeepSpeed ZeRO    stage {self.zero_stage}",
            f"denoiser params   {self.base_params / 1e6:,.2f} M (frozen, shared)",
        ]
        for role, count in self.trainable.items():
            lines.append(f"trainable {role:<8}{count / 1e6:,.2f} M ({count:,}) {self.layer_sets.get(role, '')}".rstrip())
        lines.append(f"checkpoints       {self.storage}")
        return redact("\n".join(lines))

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for ``--json`` (URI user info redacted, as in ``format``)."""
        return redact(asdict(self))


def build_plan(cfg: DistillConfig, lake_prompts: int | None = None) -> Plan:
    """Denoiser on the meta device + both adapters -> counts; the prompt count from the config, else
    ``lake_prompts`` (the lake's manifest: ``pipelines.data.prompts.lake_prompt_count``)."""
    arch = cfg.architecture or cfg.teacher
    config = denoiser_config(arch)
    family = family_of_config(config)
    with torch.device("meta"):
        denoiser = build_denoiser_on_meta(config)
        base = sum(p.numel() for p in denoiser.parameters())
        layer_sets = {}
        for role, spec in (("student", cfg.vsd.student), ("fake", cfg.vsd.fake)):
            apply_adapter(denoiser, spec, role, family)
            layer_sets[role] = f"{spec.kind} r={spec.rank} on {spec.resolved_targets(family, role)}"
    trainable = {role: count_trainable(denoiser, role) for role in ("student", "fake")}

    num_prompts: int | None = cfg.data.num_prompts or lake_prompts or None
    per_epoch = cfg.steps_per_epoch(num_prompts) if num_prompts else None
    total = cfg.total_steps(num_prompts) if num_prompts else (cfg.data.max_steps or None)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.gpus_per_worker:
        resources["GPU"] = cfg.train.gpus_per_worker
    if cfg.train.accelerator_type:  # what Ray's ScalingConfig(accelerator_type=...) adds per worker
        resources[f"accelerator_type:{cfg.train.accelerator_type}"] = 0.001
    return Plan(
        recipe=cfg.recipe, teacher=cfg.teacher, family=family, world_size=cfg.train.num_workers,
        per_worker_batch=cfg.train.per_worker_batch, global_batch=cfg.train.global_batch,
        num_prompts=num_prompts, steps_per_epoch=per_epoch, total_steps=total,
        epochs=cfg.epochs_needed(num_prompts) if num_prompts else cfg.data.epochs,
        trainable=trainable, layer_sets=layer_sets, base_params=base, resources_per_worker=resources,
        zero_stage=cfg.train.zero_stage, storage=f"{cfg.train.storage_path}/{cfg.train.run_name}",
    )
