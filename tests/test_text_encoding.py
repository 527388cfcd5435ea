"""data.text_encoding=actors: a Ray Data stage of text-encoder actors feeds the train workers,
which never load the text encoder (PixArt's T5-XXL). Tiny PixArt teacher with a tiny T5."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

PROMPTS = ["a red circle on the left", "a large blue square", "", "a green triangle on the right"]


@pytest.fixture(scope="module")
def pixart_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wadi_core.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("pixart") / "teacher", "pixart")


def test_actor_rows_equal_the_teachers_own_encoding(pixart_teacher: Path) -> None:
    from conftest import actor_rows
    from wadi_core.models import load_teacher
    from wadi_core.models.teacher import load_prompt_encoder
    from pipelines.data.text_encoding import EncodedPrompts

    teacher = load_teacher(pixart_teacher)
    want = teacher.encode_prompts(PROMPTS)
    rows = actor_rows(pixart_teacher, PROMPTS, bad=2)
    good = [0, 1, 3]
    got = EncodedPrompts([PROMPTS[i] for i in good], rows["embeds"][good], rows["mask"][good]).cond("cpu", torch.float32)
    assert torch.equal(got.embeds, want.embeds[good]) and torch.equal(got.mask, want.mask[good])
    assert not rows["embeds"][2].any() and not rows["mask"][2].any()  # a bad row is not encoded

    # bf16 travels as its 16-bit pattern and comes back bit-exact
    rows16 = actor_rows(pixart_teacher, PROMPTS, "bfloat16")
    assert rows16["embeds"].dtype == np.uint16
    back = EncodedPrompts(PROMPTS, rows16["embeds"], rows16["mask"]).cond("cpu", torch.bfloat16)
    assert torch.equal(back.embeds, load_prompt_encoder(pixart_teacher, torch.bfloat16)(PROMPTS).embeds)


def test_bf16_encoder_on_a_cpu_that_emulates_it_warns(pixart_teacher: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.data.text_encoding import TextEncoderActor, cpu_has_native_bf16

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else None
    if flags is not None:  # the probe agrees with what the kernel reports
        assert cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    for native in (False, True):
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            monkeypatch.setattr(torch.cpu, probe, lambda native=native: native, raising=False)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            TextEncoderActor(str(pixart_teacher), "bfloat16")
            TextEncoderActor(str(pixart_teacher), "float32")
        slow = [w for w in seen if "encoder_dtype=bfloat16" in str(w.message)]
        assert len(slow) == (0 if native else 1), [str(w.message) for w in seen]
        if slow:
            assert "use data.encoder_dtype=float32" in str(slow[0].message)


def test_a_teacher_without_text_encoder_answers_only_remembered_prompts(pixart_teacher: Path) -> None:
    from wadi_core.models import load_teacher

    full = load_teacher(pixart_teacher)
    bare = load_teacher(pixart_teacher, text_encoder=False)
    assert bare.text_encoder is None and bare.max_text_length == full.max_text_length
    bare.remember(PROMPTS, full.encode_prompts(PROMPTS))
    assert torch.equal(bare.null_cond(2).embeds, full.null_cond(2).embeds)
    assert torch.equal(bare.encode_prompts(PROMPTS[::-1]).embeds, full.encode_prompts(PROMPTS[::-1]).embeds)
    with pytest.raises(RuntimeError, match="without its text encoder"):
        bare.encode_prompts(["never seen"])


def test_config_defaults_and_checks() -> None:
    from wadi_core.config import ConfigError

    from pipelines.config.job import load_config

    assert load_config("pixart_alpha_256").data.text_encoding == "actors"
    for recipe in ("embedded", "sd15", "sd21"):
        assert load_config(recipe).data.text_encoding == "trainer"
    with pytest.raises(ConfigError, match="text_encoding"):
        load_config("embedded", {"data.text_encoding": "driver"})
    with pytest.raises(ConfigError, match="float16 needs GPUs"):
        load_config("embedded", {"data.text_encoding": "actors", "data.encoder_dtype": "float16"})


def _lake(root: Path, n: int = 24) -> str:
    from wadi_core.prompts import write_prompt_shards

    colours, shapes = ("red", "green", "blue"), ("circle", "square")
    samples = [(f"{i:09d}", f"a {colours[i % 3]} {shapes[i % 2]} number {i}", {}) for i in range(n)]
    write_prompt_shards(samples, str(root), shard_size=12)
    return str(root)


@pytest.mark.slow
@pytest.mark.ray
def test_actors_mode_trains_like_the_trainer_mode_without_a_text_encoder(
        tmp_path: Path, pixart_teacher: Path, ray_local) -> None:  # noqa: ANN001
    """Two short runs (2 workers, ZeRO-2, 2 steps), same seed and data: one encodes in the
    workers, one in a Ray Data actor stage. Same losses (the fp32 embeddings are equal); the
    actors-mode workers hold no text-encoder parameter; the export still has the teacher's T5."""
    from diffusers import DiffusionPipeline

    from pipelines.config.job import load_config
    from pipelines.run import run_distillation

    lake = _lake(tmp_path / "lake")
    results = {}
    for mode in ("trainer", "actors"):
        overrides = {
            "teacher": str(pixart_teacher), "vsd.student.rank": 4, "vsd.fake.rank": 2,
            "vsd.student.targets": "dit_student", "vsd.mixed_precision": "no", "vsd.gradient_checkpointing": False,
            "data.prompts": lake, "data.max_steps": 2, "data.text_encoding": mode,
            "data.encoder_cpus_per_actor": 0.5, "data.encoder_batch_size": 8, "data.encoder_gpus_per_actor": 0,
            "data.encoder_dtype": "float32", "train.gpus_per_worker": 0, "train.cpus_per_worker": 0.25,
            "train.run_name": f"te-{mode}", "train.global_batch": 4, "train.num_workers": 2,
            "train.checkpoint_every": 0, "train.storage_path": str(tmp_path / "ray"),
            "train.max_failures": 0, "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.sample_every": 0, "tracking.num_sample_prompts": 2, "evaluation.num_prompts": 0,
        }
        results[mode] = run_distillation(load_config("pixart_alpha_256", overrides))
    trainer, actors = results["trainer"].metrics, results["actors"].metrics
    assert trainer["step"] == actors["step"] == 2
    assert trainer["worker/text_encoder_params"] > 0 and actors["worker/text_encoder_params"] == 0
    for key in ("loss_gen", "loss_fake", "grad_norm_student"):
        k = next(k for k in trainer if k.endswith(key))
        assert actors[k] == pytest.approx(trainer[k], rel=1e-5, abs=1e-7), k
    pipe = DiffusionPipeline.from_pretrained(results["actors"].export_uri)
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel"
