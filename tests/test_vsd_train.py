"""train_local / jobs/distill_local.py on a tiny teacher: samples, state, export, resume."""

from __future__ import annotations

import json

import torch

from wadi_core.models.tiny import save_tiny_pipeline
from wadi_core.local_train import LocalTrainConfig, train_local
from wadi_core.vsd import AdapterSpec, TrainState, VSDConfig


def test_train_local_writes_samples_state_export_and_resumes(tmp_path):
    teacher = save_tiny_pipeline(tmp_path / "teacher", "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n\na green triangle on the left\n")
    vsd = VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 4))
    cfg = LocalTrainConfig(teacher=str(teacher), vsd=vsd, steps=2, batch_size=2, prompts=str(prompts),
                           sample_every=1, num_sample_prompts=2, out_dir=str(tmp_path / "run"))
    first = train_local(cfg, progress=False)
    run = tmp_path / "run"
    assert (run / "samples" / "step_000001.png").exists() and (run / "export" / "model_index.json").exists()
    assert TrainState.load(run / "state").step == 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    student_after_2 = {k: v.clone() for k, v in first["distiller"].teacher.denoiser.state_dict().items()}

    # Same out dir, more steps: continues from step 2 with the saved adapters and position.
    second = train_local(LocalTrainConfig(**{**cfg.__dict__, "steps": 3}), progress=False, export=False)
    assert second["step"] == 3
    assert TrainState.load(run / "state").data_position == 6
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    resumed = second["distiller"].teacher.denoiser.state_dict()
    changed = [k for k in student_after_2 if "adapters.student" in k and not torch.equal(student_after_2[k], resumed[k])]
    assert changed  # it trained on from the restored student

    # Another adapter config in the same out dir: refused before anything is loaded (the Ray trainer's rule).
    import pytest

    from wadi_core.vsd.state import IncompatibleCheckpoint

    wider = VSDConfig(student=AdapterSpec("lorad", 8), fake=AdapterSpec("lorad", 4))
    with pytest.raises(IncompatibleCheckpoint, match="another student"):
        train_local(LocalTrainConfig(**{**cfg.__dict__, "vsd": wider, "steps": 4}), progress=False, export=False)


def test_distill_local_job_reads_recipe_and_overrides(tmp_path):
    import importlib

    mod = importlib.import_module("jobs.distill_local")
    recipe = tmp_path / "r.yaml"
    # data/train sections belong to the Ray job: this job takes the sections it has fields for
    recipe.write_text("teacher: /some/dir\nvsd:\n  gen_lr: 3.0e-4\n  student: {kind: lorad, rank: 8}\n"
                      "train: {num_workers: 4}\n")
    from pipelines.config.cli import load_job_config

    cfg = load_job_config(mod.DistillLocalJob, str(recipe), ["steps=7", "vsd.fake.rank=2", "vsd.loss=dmd2",
                                                           "domain_eval.num_prompts=10"])
    assert cfg.teacher == "/some/dir" and cfg.steps == 7 and cfg.batch_size == 64 and cfg.domain_eval.num_prompts == 10
    assert cfg.vsd.gen_lr == 3e-4 and cfg.vsd.student.rank == 8 and cfg.vsd.fake.rank == 2 and cfg.vsd.loss == "dmd2"
