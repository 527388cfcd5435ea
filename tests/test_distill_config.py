"""Distillation job config: recipes, validation before any cluster resources, the dry-run plan."""

from __future__ import annotations

import sys

import pytest

from wadi_core.config import ConfigError

from pipelines.config.cli import available_recipes
from pipelines.config.job import DistillConfig, load_config, parse_overrides


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def test_recipes_ship_and_load() -> None:
    assert {"embedded", "sd15", "sd21", "pixart_alpha_256"} <= set(available_recipes())
    for name in available_recipes():
        cfg = load_config(name)
        assert isinstance(cfg, DistillConfig) and cfg.recipe == name


@pytest.mark.parametrize("name,rank", [("sd15", 256), ("sd21", 256), ("pixart_alpha_256", 128)])
def test_paper_recipes_hold_the_paper_settings(name: str, rank: int) -> None:
    cfg = load_config(name)
    assert (cfg.train.global_batch, cfg.train.num_workers, cfg.train.per_worker_batch) == (128, 8, 16)
    assert cfg.vsd.student.kind == "lorad" and cfg.vsd.student.rank == rank and cfg.vsd.fake.rank == 32
    assert (cfg.vsd.gen_lr, cfg.vsd.fake_lr, cfg.vsd.guidance_real) == (1e-4, 1e-2, 1.5)
    # The official launch scripts: fp16 (DeepSpeed's dynamic loss scaling) for SD, bf16 for PixArt.
    assert cfg.vsd.mixed_precision == ("bf16" if name.startswith("pixart") else "fp16")
    assert cfg.data.epochs == 2 and cfg.vsd.gradient_checkpointing and cfg.vsd.student_alphabar == 0.0047
    # 1,418,723 captions / 128 per step, 2 epochs: the paper's "~22k steps"
    assert cfg.total_steps(cfg.data.num_prompts) == 2 * (1_418_723 // 128)


def test_embedded_default_is_small() -> None:
    cfg = load_config("embedded")
    assert cfg.train.num_workers == 2 and cfg.train.cpus_per_worker < 1  # leaves a CPU to Ray Data
    # README command 1 stays a few-minute run: at most 900 steps on 2 workers + the closing evaluation
    # (~3 steps/s: 6 min 41 s in all on 2026-12-05).
    assert cfg.train.zero_stage == 2 and 0 < cfg.data.max_steps <= 900
    assert cfg.evaluation.num_prompts >= 1000 and cfg.vsd.student_ema > 0
    assert cfg.vsd.student_alphabar == "auto"  # the shipped teacher is v-prediction: its schedule's alphabar_999


def test_student_ema_under_zero3_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"vsd.student_ema needs train.zero_stage <= 2.*vsd.student_ema=0"):
        load_config("embedded", ["train.zero_stage=3"])
    assert load_config("embedded", ["train.zero_stage=3", "vsd.student_ema=0"]).train.zero_stage == 3


def test_unknown_recipe_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown recipe 'sd99'.*embedded.*sd15"):
        load_config("sd99")


def test_zero_stage_4_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"zero_stage=4.*stages 0, 1, 2 and 3"):
        load_config("embedded", ["train.zero_stage=4"])


def test_batch_must_split_over_workers() -> None:
    with pytest.raises(ConfigError, match=r"global_batch=30 does not split evenly over train.num_workers=4"):
        load_config("sd15", {"train.global_batch": 30, "train.num_workers": 4})


@pytest.mark.parametrize("override,pattern", [
    ("train.zero_stag=2", r"unknown config key\(s\) \['train.zero_stag'\]"),
    ("vsd.student.rnk=4", r"unknown config key\(s\) \['vsd.student.rnk'\]"),
    ("train.num_workers=two", r"train.num_workers: expected an integer"),
    ("data.epochs=0", r"data.epochs must be >= 1"),
    ("vsd.mixed_precision=fp16", r"fp16 needs GPUs"),
])
def test_bad_values_and_keys(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config("embedded", [override])


def test_overrides_parse_as_yaml_scalars() -> None:
    assert parse_overrides(["train.zero_stage=3", "vsd.guidance_real=2.5", "train.run_name=a-b"]) == {
        "train.zero_stage": 3, "vsd.guidance_real": 2.5, "train.run_name": "a-b"}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["zero_stage"])
    cfg = load_config("embedded", ["train.zero_stage=3", "vsd.student.rank=8", "vsd.student_ema=0"])
    assert cfg.train.zero_stage == 3 and cfg.vsd.student.rank == 8


def test_flat_round_trip() -> None:
    from wadi_core.config import from_dict

    cfg = load_config("sd21")
    assert from_dict(DistillConfig, cfg.to_flat()) == cfg


def test_deepspeed_config_follows_the_job() -> None:
    from pipelines.train.engines import deepspeed_config

    cfg = load_config("sd15")
    ds = deepspeed_config(cfg.train, cfg.vsd)
    # fp16 / bf16 recipes: fp32 engines (fp32 adapters); the distiller casts the base, autocasts the forward
    assert cfg.vsd.mixed_precision == "fp16" and ds["zero_optimization"]["stage"] == 2
    pixart = load_config("pixart_alpha_256")
    assert pixart.vsd.mixed_precision == "bf16"
    assert not {"fp16", "bf16", "torch_autocast"} & (set(ds) | set(deepspeed_config(pixart.train, pixart.vsd)))
    assert ds["train_batch_size"] == 128 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_clipping"] == 1.0 and ds["zero_allow_untested_optimizer"]


def test_cli_rejects_bad_config_before_ray(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import distill

    assert distill.main(["--config", "embedded", "train.zero_stage=4"]) == 2
    assert "ZeRO" in capsys.readouterr().err
    assert distill.main(["--config", "nope"]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert distill.main(["train.global_batch=33"]) == 2
    assert "does not split evenly" in capsys.readouterr().err
    assert not _ray_started()


def test_dry_run_sd15_on_meta(capsys: pytest.CaptureFixture[str]) -> None:
    from jobs import distill

    assert distill.main(["--config", "sd15", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 workers" in out and "steps per epoch   11,083" in out and "total steps       22,166" in out
    assert "trainable student 83.80 M" in out  # the paper's count for SD1.5, r=256
    assert "trainable fake" in out
    assert not _ray_started()
