"""Downstream tasks with a one-step student: ControlNet, DreamBooth, ReVersion.

Unit checks of the pieces a user relies on (reading images by the renderer's geometry, a fresh
ControlNet changing nothing, adapters moving exactly onto a student, learned tokens loading into
another model) and a smoke run of each job on tiny settings whose outputs must exist and load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


from wadi_core.downstream import geometry as geo
from wadi_core.downstream.subjects import Scene, render_scene, render_subject


@pytest.fixture(scope="module")
def student_export(tmp_path_factory) -> Path:
    """An untrained one-step export of the embedded teacher (LoRaD at identity) as the student."""
    from wadi_core.export import export_one_step_pipeline
    from wadi_core.models import load_teacher
    from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller

    torch.manual_seed(0)
    distiller = WaDiDistiller(load_teacher("embedded"), VSDConfig(student=AdapterSpec("lorad", 2),
                                                                  fake=AdapterSpec("lorad", 2)))
    return export_one_step_pipeline(distiller, tmp_path_factory.mktemp("student") / "export")


# --------------------------------------------------------------------------------- geometry
def test_geometry_reads_renders_exactly():
    from wadi_core.domain import ALL_COMBOS, render_with_mask

    combos = ALL_COMBOS[::7]
    renders = [render_with_mask(a, seed=i) for i, a in enumerate(combos)]
    images = np.stack([r[0] for r in renders])
    truth = np.stack([r[1] for r in renders]) > 0.5  # exactly half-covered edge pixels are a tie
    masks = geo.foreground_mask(images)
    assert geo.iou(masks, truth).min() > 0.85
    assert geo.object_colour(images, masks) == [a.colour for a in combos]
    assert [geo.position_of(m) for m in masks] == [a.position for a in combos]
    # a star is concave, every domain shape is (nearly) convex
    star = geo.solidity(geo.foreground_mask(render_subject("star", "red", "large", "left", 0)[0][None])[0])
    assert star < 0.75 < min(geo.solidity(m) for m in masks)


@pytest.mark.parametrize("relation", geo.RELATIONS)
def test_relation_of_two_object_scenes(relation):
    for seed in range(5):
        scene = Scene("circle", "red", relation, "square", "blue")
        image, cov_a, cov_b = render_scene(scene, seed)
        a, b = geo.colour_masks(image, ["red", "blue"])
        assert geo.iou(a[None], (cov_a >= 0.5)[None])[0] > 0.7
        assert geo.relation_of(a, b) == relation
        assert geo.layout_axis(image) == ("vertical" if relation in ("above", "below") else "horizontal")
        assert geo.relation_of(b, np.zeros_like(b)) is None  # a missing object is not a relation


# --------------------------------------------------------------------------------- ControlNet
def test_fresh_controlnet_changes_nothing_and_a_trained_one_does():
    from wadi_core.downstream.controlnet import (ControlNetConfig, build_controlnet, control_eval_set,
                                                 control_tensor, controlnet_residuals, train_controlnet)
    from wadi_core.downstream.sampling import sample, seeded_noise
    from wadi_core.models import load_teacher

    torch.manual_seed(0)
    teacher = load_teacher("embedded")
    prompts, masks = control_eval_set(3)
    noise = seeded_noise(teacher, 3, seed=0)
    plain = sample(teacher, prompts, noise, 2, 3.0)
    cn = build_controlnet(teacher)
    control = control_tensor(masks, cn, teacher)
    torch.testing.assert_close(sample(teacher, prompts, noise, 2, 3.0, controlnet_residuals(cn, control)), plain)
    with pytest.raises(ValueError, match="embedding_channels"):
        build_controlnet(teacher, ControlNetConfig(embedding_channels=(16, 32, 64, 128)))
    cn, summary = train_controlnet(teacher, ControlNetConfig(steps=3, batch_size=4, num_images=16, lr=1e-2),
                                   progress=False)
    assert summary["train_steps"] == 3
    moved = sample(teacher, prompts, noise, 2, 3.0, controlnet_residuals(cn, control))
    assert (moved - plain).abs().max() > 1e-4


def test_load_controlnet_refuses_what_is_not_a_safetensors_controlnet(tmp_path):
    from wadi_core.downstream.controlnet import load_controlnet

    with pytest.raises(FileNotFoundError, match="not a diffusers ControlNetModel"):
        load_controlnet(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_controlnet(tmp_path)


def test_load_controlnet_from_s3(s3_bucket, tmp_path):
    from wadi_core import storage
    from wadi_core.downstream.controlnet import build_controlnet, load_controlnet
    from wadi_core.models import load_teacher

    cn = build_controlnet(load_teacher("embedded"))
    cn.save_pretrained(tmp_path / "cn", safe_serialization=True)
    storage.upload_dir(tmp_path / "cn", f"s3://{s3_bucket}/controlnets/silhouette")
    loaded = load_controlnet(f"s3://{s3_bucket}/controlnets/silhouette")
    for (name, p), q in zip(cn.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


@pytest.mark.slow
def test_controlnet_job_smoke(student_export, tmp_path):
    from jobs import controlnet as job
    import mlflow

    from wadi_core.downstream.controlnet import load_controlnet

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "cn"
    result = job.main([f"student={student_export}", "steps=2", "batch_size=4", "num_images=16", "eval_prompts=4",
                       "teacher_steps=2", "fid_reference=32", "timing_batch=2", f"out={out}", f"tracking_uri={uri}",
                       "threads=1"])
    cn = load_controlnet(out / "controlnet")
    assert cn.config.conditioning_channels == 1
    saved = json.loads((out / "metrics.json").read_text())
    for row in ("teacher+controlnet", "student+controlnet", "teacher (no control)", "student (no control)"):
        assert 0 <= saved["rows"][row]["iou"] <= 1 and saved["rows"][row]["seconds_per_image"] > 0
    from PIL import Image

    assert Image.open(out / "grid.png").size[0] > 5 * 4 * 32
    run = mlflow.MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert "iou_student_over_teacher" in run.data.metrics and run.data.params["controlnet"] == "trained"
    artifacts = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert {"grid.png", "metrics.json", "controlnet"} <= artifacts
    # a ControlNet the user already has: no training, same evaluation
    again = job.main([f"student={student_export}", f"controlnet={out / 'controlnet'}", "eval_prompts=2",
                      "teacher_steps=2", "fid_reference=0", "timing_batch=1", "baselines=false",
                      f"out={tmp_path / 'cn2'}", f"tracking_uri={uri}"])
    assert again["train"]["train_steps"] == 0 and set(again["rows"]) == {"teacher+controlnet", "student+controlnet"}


# --------------------------------------------------------------------------------- DreamBooth
@pytest.mark.parametrize("kind", ["lorad", "lora", "full"])
def test_subject_adapter_moves_exactly_onto_a_student(kind):
    """When the student is the teacher itself, teacher+adapter and student+moved adapter agree."""
    from wadi_core.adapters import add_adapter, adapter_parameters, set_adapter
    from wadi_core.downstream.dreambooth import apply_subject_adapter
    from wadi_core.models import load_teacher
    from wadi_core.models.teacher import Cond

    torch.manual_seed(0)
    teacher, student = load_teacher("embedded"), load_teacher("embedded")
    add_adapter(teacher.denoiser, kind, "subject", 0 if kind == "full" else 2, "unet_student")
    with torch.no_grad():
        for p in adapter_parameters(teacher.denoiser, "subject"):
            p.add_(torch.randn_like(p) * 0.05)
    set_adapter(teacher.denoiser, "subject")
    x, cond = torch.randn(2, *teacher.latent_shape), Cond(teacher.encode_prompts(["a red sks", "x"]).embeds)
    before = student.predict_eps(x, torch.tensor([500]), cond)
    apply_subject_adapter(student, teacher)
    want = teacher.predict_eps(x, torch.tensor([500]), cond)
    assert (want - before).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(student.predict_eps(x, torch.tensor([500]), cond), want, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_dreambooth_job_smoke(student_export, tmp_path):
    from jobs import dreambooth as job

    from wadi_core.adapters import load_adapter
    from wadi_core.models import load_teacher

    out = tmp_path / "db"
    result = job.main([f"student={student_export}", "kinds=[lorad,full]", "seeds=[0]", "steps=2", "prior_batch=2",
                       "max_test_prompts=2", "teacher_steps=2", f"out={out}",
                       f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "threads=1"])
    for kind in ("lorad", "full"):
        load_adapter(load_teacher("embedded").denoiser, "subject", out / "adapters" / f"{kind}_seed0.safetensors")
        for sampler in ("teacher 2 steps", "student 1 step"):
            scores = result["rows"][f"{kind} / {sampler}"]
            assert 0 <= scores["adherence"][0] <= 1 and -1 <= scores["fidelity"][0] <= 1
    assert result["trainable_params"]["lorad"] < result["trainable_params"]["full"]
    assert "| lorad | student 1 step |" in (out / "table.md").read_text()
    assert (out / "grid.png").stat().st_size > 0 and (out / "instances.png").stat().st_size > 0


# --------------------------------------------------------------------------------- ReVersion
def test_learned_token_round_trips_into_another_model(tmp_path):
    from wadi_core.downstream.reversion import RelationConfig, invert_relation, load_token, save_token
    from wadi_core.models import load_teacher

    teacher, other = load_teacher("embedded"), load_teacher("embedded")
    table = teacher.text_encoder.get_input_embeddings().weight.detach().clone()
    inv = invert_relation(teacher, RelationConfig(num_exemplars=2, steps=2, batch_size=2, lr=0.1), progress=False)
    after = teacher.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(after[:len(table)], table)  # only the new token learned
    assert "<R>" in inv["exemplar_captions"][0] and "above" not in inv["exemplar_captions"][0]
    save_token(teacher, "<R>", tmp_path / "r.safetensors", "above")
    assert load_token(other, tmp_path / "r.safetensors") == "<R>"
    prompt = ["a red circle <R> a blue square"]
    torch.testing.assert_close(other.encode_prompts(prompt).embeds, teacher.encode_prompts(prompt).embeds)
    with pytest.raises(ValueError, match="already in the vocabulary"):
        load_token(other, tmp_path / "r.safetensors")


@pytest.mark.slow
def test_reversion_job_smoke(tmp_path):
    """Scene teacher -> its student (jobs/distill_local.py, 1 step) -> token -> both samplers."""
    from jobs import reversion as job

    from wadi_core.downstream.reversion import load_token
    from wadi_core.downstream.sampling import load_one_step_student
    from wadi_core.models import load_teacher

    out = tmp_path / "rv"
    result = job.main([f"scene_teacher={tmp_path / 'scene'}", "scene.steps=2", "scene.batch_size=4",
                       "scene.num_images=16", "distill_steps=1", "relation.num_exemplars=2", "relation.steps=2",
                       "relation.batch_size=2", "eval_scenes=2", "teacher_steps=2", "timing_batch=1", f"out={out}",
                       f"tracking_uri=sqlite:///{tmp_path / 'm.db'}", "threads=1"])
    scene_teacher = load_teacher(tmp_path / "scene")  # the fine-tuned scene teacher is a pipeline
    assert load_token(scene_teacher, out / "tokens" / "above.safetensors") == "<R-above>"
    assert load_token(load_one_step_student(result["student"]), out / "tokens" / "above.safetensors") == "<R-above>"
    for key in ("above: teacher 2 steps, <R>", "above: student 1 step, <R>"):
        assert 0 <= result["rows"][key]["relation_accuracy"] <= 1 and result["rows"][key]["seconds_per_image"] > 0
    assert (out / "grid.png").exists() and (out / "exemplars_above.png").exists()
