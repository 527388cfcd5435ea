"""Every config key says what it is: in ``--help-config`` and as a comment in ``--print-config``."""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from wadi_core.config import field_help

from pipelines.config.cli import config_help, format_config, format_config_help
from pipelines.config.job import DistillConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def _job_configs() -> dict[str, type]:
    """The config class of every job in jobs/ (each subcommand's of evaluate and make_prompt_shards),
    with the library configs they nest (wadi_core, experiments/, pipelines/serve)."""
    from jobs.ablate import AblationJob
    from jobs.analyze_weights import AnalyzeWeightsJob
    from jobs.compare_runs import CompareRunsJob
    from jobs.controlnet import ControlNetJob
    from jobs.distill_local import DistillLocalJob
    from jobs.dreambooth import DreamBoothJob
    from jobs.eval_teacher_domain import TeacherEvalJob
    from jobs.evaluate import EvaluateJob, PromptsJob, ScheduleJob
    from jobs.export import ExportJob
    from jobs.generate import GenerateJob
    from jobs.make_prompt_shards import DomainShards, JourneyDBShards
    from jobs.pretrain_teacher import PretrainJob
    from jobs.reversion import ReVersionJob
    from jobs.serve import ServeConfig
    from jobs.train_domain_evaluator import EvaluatorJob

    return {c.__name__: c for c in (DistillConfig, EvaluateJob, ScheduleJob, PromptsJob, CompareRunsJob, ExportJob,
                                    GenerateJob, DomainShards, JourneyDBShards, TeacherEvalJob, EvaluatorJob,
                                    AblationJob, AnalyzeWeightsJob, ControlNetJob, DistillLocalJob, DreamBoothJob,
                                    PretrainJob, ReVersionJob, ServeConfig)}


@pytest.mark.parametrize("name", sorted(_job_configs()))
def test_every_key_of_the_job_has_a_description(name: str) -> None:
    helps = config_help(_job_configs()[name])
    assert len(helps) > 3
    missing = sorted(k for k, text in helps.items() if not text.strip())
    assert not missing, f"{name}: describe these fields (a '# comment' on the field's line): {missing}"


def test_every_job_with_a_config_is_checked() -> None:
    configs = set(_job_configs().values())
    jobs = [p.stem for p in sorted((ROOT / "jobs").glob("*.py")) if "config_from_args(" in p.read_text()]
    assert len(jobs) >= 16
    for name in jobs:
        module = importlib.import_module(f"jobs.{name}")
        assert configs & {v for v in vars(module).values() if isinstance(v, type)}, \
            f"jobs/{name}.py: add its config class to _job_configs()"


def test_descriptions_come_from_metadata_docstrings_and_comments() -> None:
    @dataclass(frozen=True)
    class Example:
        a: int = 1  # the trailing comment
        # the comment lines
        # just above
        b: int = 2
        c: int = 3
        """the attribute docstring"""
        d: str = "x#y"
        e: int = field(default=5, metadata={"help": "from the metadata"})  # not this

    assert field_help(Example) == {"a": "the trailing comment", "b": "the comment lines just above",
                                   "c": "the attribute docstring", "d": "", "e": "from the metadata"}


def test_print_config_is_the_same_yaml_with_one_comment_per_key() -> None:
    cfg = load_config("sd15")
    text = format_config(cfg)
    assert "  gen_lr: " in text and "# learning rate of the student (generator) adapter" in text
    assert "evaluation:  # " in text and "  ray:  # " in text
    # the comments change nothing: the YAML reads back as the same config, and loads as a recipe
    data = yaml.safe_load(text)
    assert data["vsd"]["adam_betas"] == list(cfg.vsd.adam_betas) and data["train"]["run_name"] == cfg.train.run_name
    leaves = [line for line in text.splitlines() if not line.rstrip().endswith(":") and ":  #" not in line]
    assert all("  # " in line for line in leaves), [line for line in leaves if "  # " not in line][:5]


def test_print_config_output_is_a_recipe(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(format_config(load_config("embedded", ["vsd.gen_lr=3e-4"])))
    assert load_config(str(path)).vsd.gen_lr == pytest.approx(3e-4)


def test_help_config_lists_keys_defaults_and_descriptions() -> None:
    text = format_config_help(DistillConfig)
    assert "\n  vsd.gen_lr = 0.0001\n      learning rate of the student (generator) adapter" in text
    assert "\nevaluation: " in text and "  evaluation.ray.batch_size = 64\n" in text
    from jobs.generate import GenerateJob

    # a job with a required key still lists the defaults of the others
    text = format_config_help(GenerateJob)
    assert "  out = (required)\n" in text and "  draw_seed = 2024\n      seed of the one-caption-per-image draw" in text


@pytest.mark.timeout(120)
def test_jobs_print_help_config_and_commented_config() -> None:
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True, timeout=100)
    out = run("jobs/distill.py", "--help")
    assert out.returncode == 0 and "--help-config" in out.stdout
    out = run("jobs/distill.py", "--help-config")
    assert out.returncode == 0 and "train.global_batch = 32\n      prompts per optimizer step" in out.stdout
    out = run("jobs/evaluate.py", "run", "--print-config")
    assert out.returncode == 0 and "draw_seed: 2024  # seed of the one-caption-per-image draw" in out.stdout
