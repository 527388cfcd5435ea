"""What the GPU path needs that a CPU run would not notice: collectives on the training device,
no runtime_env clash inside a submitted Ray job, accelerator types, big-model loading."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipelines.runtime.collectives import all_ranks_true, any_rank_true, sum_over_ranks

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_world():
    """A 1-rank gloo process group in this process, destroyed afterwards."""
    from tests.conftest import reset_process_group

    reset_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_port()}", rank=0, world_size=1)
    yield
    reset_process_group()


class _Seen(Exception):
    """Raised by the spy once it has recorded a collective's tensor (gloo cannot reduce it)."""


def test_collectives_build_their_tensors_on_the_device_they_are_given(gloo_world, monkeypatch) -> None:
    """A spy on all_reduce records the device of every tensor handed to it. With the 'meta'
    device standing in for a GPU, a helper that built its tensor anywhere else (the CPU, as the
    old defaults did) would be seen here; on the CPU they still give the right answers."""
    real = dist.all_reduce
    seen: list[torch.device] = []

    def spy(tensor: torch.Tensor, *args, **kwargs):
        seen.append(tensor.device)
        if tensor.device.type != "cpu":
            raise _Seen(f"all_reduce on {tensor.device}")
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", spy)
    calls = [lambda d: all_ranks_true(True, d), lambda d: any_rank_true(False, d), lambda d: sum_over_ranks([1, 2], d)]
    for call in calls:
        with pytest.raises(_Seen, match="all_reduce on meta"):
            call(torch.device("meta"))
    assert seen == [torch.device("meta")] * 3
    seen.clear()
    assert all_ranks_true(True, "cpu") and not any_rank_true(False, "cpu") and sum_over_ranks([1, 2], "cpu") == [1, 2]
    assert seen == [torch.device("cpu")] * 3


def test_collectives_take_no_default_device() -> None:
    """The device is a required argument: a call site cannot silently fall back to the CPU."""
    for fn in (all_ranks_true, any_rank_true):
        with pytest.raises(TypeError, match="missing 1 required positional argument: 'device'"):
            fn(True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'device'"):
        sum_over_ranks([1])  # type: ignore[call-arg]


def test_train_loop_passes_the_training_device_to_every_collective() -> None:
    """Every collective helper call in the train loop (the Trainer and its components) names the
    worker's training device."""
    import ast

    calls = []
    for path in (REPO / "pipelines" / "train" / f for f in ("worker.py", "checkpoint_manager.py", "preemption.py")):
        calls += [(path.name, n) for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Name) and n.func.id in ("all_ranks_true", "any_rank_true", "sum_over_ranks")]
    assert len(calls) >= 5
    for name, call in calls:
        device = ast.unparse(call.args[1]) if len(call.args) > 1 else ""
        assert device == "self.device", f"{name}:{call.lineno}: {ast.unparse(call)}"


WORKER = r"""
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from pipelines.runtime.collectives import all_ranks_true, any_rank_true, sum_over_ranks
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
out = {"all": all_ranks_true(rank == 0, "cpu"), "any": any_rank_true(rank == 0, "cpu"),
       "all_true": all_ranks_true(True, "cpu"), "sum": sum_over_ranks([rank, 10], "cpu")}
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_collectives_agree_over_two_ranks() -> None:
    port = str(_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(r), port, str(REPO)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert outs[0] == outs[1] == {"all": False, "any": True, "all_true": True, "sum": [1, 20]}


def test_collectives_and_wadi_core_import_without_ray_deepspeed_mlflow(tmp_path: Path) -> None:
    from tests.test_gpu_check import _blocked_env

    code = ("import pipelines.runtime.collectives, wadi_core.models, wadi_core.vsd, wadi_core.adapters, wadi_core.export\n"
            "import sys; print(sorted(m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_blocked_env(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------- runtime_env in a Ray job
def _job_env(env_vars: dict[str, str]) -> dict[str, str]:
    return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": env_vars}, "metadata": {}})}


def test_runtime_env_leaves_out_what_the_submitted_job_sets() -> None:
    from pipelines.runtime.cluster import without_job_conflicts

    ours = {"env_vars": {"AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1"}, "working_dir": "."}
    assert without_job_conflicts(ours, {}) == ours  # not inside a submitted job: unchanged
    job = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"env_vars": {"AWS_DEFAULT_REGION": "eu-west-1"},
                                                                      "working_dir": "s3://b/code.zip"}})}
    assert without_job_conflicts(ours, job) == {"env_vars": {"HF_HUB_OFFLINE": "1"}}
    assert without_job_conflicts({"env_vars": {"AWS_DEFAULT_REGION": "x"}}, job) is None


DRIVER = r"""
import os, ray
from pipelines.evaluate.runs import init_evaluation_ray
from pipelines.evaluate.metrics import env_for_workers
try:  # what Ray does with the old call: refuse the driver's runtime env
    ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env={"env_vars": env_for_workers()})
    clash = "none"
    ray.shutdown()
except ValueError as e:
    clash = "refused" if "Failed to merge the Job's runtime env" in str(e) else repr(e)
init_evaluation_ray(num_cpus=1)

@ray.remote(num_cpus=0)
def seen():
    return os.environ.get("AWS_DEFAULT_REGION"), os.environ.get("HF_HUB_OFFLINE")

print("RESULT", clash, *ray.get(seen.remote()))
ray.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_evaluation_driver_starts_inside_a_job_that_sets_a_conflicting_variable() -> None:
    """As under ``ray job submit --runtime-env-json '{"env_vars": {"AWS_DEFAULT_REGION": ...}}'``:
    the job's config reaches the driver in RAY_JOB_CONFIG_JSON_ENV_VAR and its variables are in
    the driver's environment. The evaluation/generation driver's init_evaluation_ray must not clash."""
    env = {**os.environ, **_job_env({"AWS_DEFAULT_REGION": "eu-west-1"}), "AWS_DEFAULT_REGION": "eu-west-1",
           "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-c", DRIVER], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT"))
    assert line.split() == ["RESULT", "refused", "eu-west-1", "1"]  # Ray refuses the old call; ours works


# --------------------------------------------------------------------------- accelerator types
def test_accelerator_type_reaches_the_scaling_config_and_is_checked() -> None:
    from wadi_core.config import ConfigError

    from pipelines.runtime.cluster import check_accelerator_available
    from pipelines.config.job import load_config
    from pipelines.run import _trainer

    cfg = load_config("sd15", {"train.accelerator_type": "A100"})
    trainer = _trainer(cfg, {}, {})
    assert trainer.scaling_config.accelerator_type == "A100" and trainer.scaling_config.use_gpu
    assert _trainer(load_config("sd15"), {}, {}).scaling_config.accelerator_type is None
    with pytest.raises(ConfigError, match="train.gpus_per_worker"):
        load_config("embedded", {"train.accelerator_type": "A100"})  # CPU workers cannot ask for a GPU model
    with pytest.raises(ConfigError, match="not a Ray accelerator type"):
        load_config("sd15", {"train.accelerator_type": "A100 80GB"})
    cluster = {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 1.0}
    check_accelerator_available("A100", cluster, "train.accelerator_type")
    with pytest.raises(ConfigError, match="found: A100"):
        check_accelerator_available("H100", cluster, "train.accelerator_type")
    with pytest.warns(UserWarning, match="autoscaling"):
        check_accelerator_available("H100", cluster, "train.accelerator_type", strict=False)


def test_evaluation_flags_for_accelerator_and_metric_gpus() -> None:
    import importlib

    evaluate = importlib.import_module("jobs.evaluate")
    r = evaluate.parse_args(["run", "ray.gpus_per_actor=1", "ray.metric_gpus_per_actor=0.5",
                             "ray.accelerator_type=A10G"])[1].ray
    assert (r.gpus_per_actor, r.metric_gpus, r.accelerator_for(r.metric_gpus)) == (1.0, 0.5, "A10G")
    assert evaluate.parse_args(["run", "ray.gpus_per_actor=0.5"])[1].ray.metric_gpus == 0.5
    assert r.accelerator_for(0.0) is None  # CPU actors are not tied to a GPU model
    for bad in (["ray.accelerator_type=A10G"], ["ray.gpus_per_actor=1.5"], ["ray.metric_gpus_per_actor=-1"]):
        with pytest.raises(SystemExit, match=r"^2$") as exc:
            evaluate.parse_args(["run", *bad])
        assert exc.value.code == 2


def test_generation_and_metric_actors_ask_ray_for_their_accelerator(monkeypatch) -> None:
    """The accelerator type and each stage's own GPUs reach Ray Data's map_batches (no Ray started:
    the dataset is a recorder)."""
    ray_data = pytest.importorskip("ray.data")
    from pipelines.evaluate.config import MetricsSpec, ModelSpec
    from pipelines.evaluate.generation import PromptRecord, generation_dataset
    from pipelines.evaluate.metrics import features_and_stats

    calls: list[dict] = []

    class Recorder:
        def map_batches(self, fn, **kwargs):
            calls.append({"fn": getattr(fn, "__name__", ""), **kwargs})
            return self

        def materialize(self):
            return self

        def take_all(self):
            return []

    monkeypatch.setattr(ray_data, "from_items", lambda *a, **k: Recorder())
    records = [PromptRecord(idx=i, key=f"k{i}", prompt="a red circle") for i in range(2)]
    ds = generation_dataset(records, ModelSpec(), gpus_per_actor=1.0, accelerator_type="A10G")
    features_and_stats(ds, MetricsSpec(extractor="none", scorers=()), gpus_per_actor=0.5, accelerator_type="A10G")
    generation_dataset(records, ModelSpec(), gpus_per_actor=0.0, accelerator_type="A10G")
    gen, metric, cpu = calls
    assert (gen["fn"], gen["num_gpus"], gen["accelerator_type"]) == ("GeneratorActor", 1.0, "A10G")
    assert (metric["fn"], metric["num_gpus"], metric["accelerator_type"]) == ("MetricActor", 0.5, "A10G")
    assert cpu["accelerator_type"] is None  # CPU actors are not tied to a GPU model


# ---------------------------------------------------------------------------- big-model loading
def test_teacher_components_load_with_low_cpu_mem_usage(monkeypatch) -> None:
    """accelerate is installed, and every model component is built on the meta device and filled
    from its checkpoint (one copy in RAM while loading), not randomly initialised first."""
    import importlib.util

    import diffusers
    import transformers

    from wadi_core.models import load_prompt_encoder, load_teacher

    assert importlib.util.find_spec("accelerate") is not None, "accelerate is a dependency (pyproject.toml)"
    calls: list[tuple[str, object]] = []
    for base in (diffusers.ModelMixin, transformers.PreTrainedModel):
        original = base.from_pretrained.__func__

        def spy(cls, *args, _original=original, **kwargs):
            calls.append((cls.__name__, kwargs.get("low_cpu_mem_usage")))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(base, "from_pretrained", classmethod(spy))
    load_teacher("embedded")
    load_prompt_encoder("embedded")
    names = [n for n, _ in calls]
    assert {"UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel"} <= set(names), names
    assert all(flag is True for _, flag in calls), calls
