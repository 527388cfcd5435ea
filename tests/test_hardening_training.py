"""Training state: no unpickling of files from storage, SHA-256 manifests, fallback to
the previous complete checkpoint, non-finite steps skipped + counted, MLflow status of a failed
resume. DeepSpeed runs in one process on a gloo world of 1 (no Ray)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from wadi_core.models import load_teacher
from wadi_core.models.teacher import Cond
from wadi_core.models.tiny import save_tiny_pipeline
from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller, vsd_step
from wadi_core.local_train import LocalTrainConfig, train_local
from wadi_core.vsd import NonFiniteGuard, NonFiniteTraining, make_updaters
from wadi_core.vsd.ema import AdapterEMA

PROMPTS = ["a red circle", "a small blue square on the left"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), "sd", seed=0)


def _distiller(sd_dir) -> WaDiDistiller:
    torch.manual_seed(0)
    return WaDiDistiller(load_teacher(sd_dir), VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 2),
                                                         gen_lr=1e-3, fake_lr=1e-2))


def _nan(cond: Cond) -> Cond:
    return Cond(cond.embeds * float("nan"), cond.mask)


def _adapters(d: WaDiDistiller) -> dict[str, list[torch.Tensor]]:
    return {r: [p.detach().clone() for p in d.parameters(r)] for r in ("student", "fake")}


def _finite(params: dict[str, list[torch.Tensor]]) -> bool:
    return all(torch.isfinite(p).all() for ps in params.values() for p in ps)


def _same(a: dict[str, list[torch.Tensor]], b: dict[str, list[torch.Tensor]]) -> bool:
    return all(torch.equal(x, y) for r in a for x, y in zip(a[r], b[r]))


def _poisoned_step(d: WaDiDistiller, cond: Cond, ups: dict, gen: torch.Generator, poison: str) -> dict[str, float]:
    """A ``vsd_step`` whose loss is NaN ("loss": NaN text embeddings) or whose loss is finite but
    one gradient of each adapter is NaN ("gradient": a hook on one parameter per role)."""
    if poison == "loss":
        return vsd_step(d, _nan(cond), ups["student"], ups["fake"], gen)
    hooks = [next(iter(d.parameters(r))).register_hook(lambda g: torch.full_like(g, float("nan")))
             for r in ("student", "fake")]
    try:
        m = vsd_step(d, cond, ups["student"], ups["fake"], gen)
    finally:
        for h in hooks:
            h.remove()
    assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss_gen", "loss_fake"))  # only the gradients
    return m


# -- non-finite steps: plain updater and the single-process loop ---------------------------------

@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_torch_updater_skips_a_nan_batch_for_both_roles(sd_dir, poison):
    d = _distiller(sd_dir)
    ups = make_updaters(d)
    cond, gen = d.teacher.encode_prompts(PROMPTS), torch.Generator().manual_seed(0)
    vsd_step(d, cond, ups["student"], ups["fake"], gen)  # Adam state exists now
    before, adam_steps = _adapters(d), [u.optimizer.state_dict()["state"][0]["step"].item() for u in ups.values()]
    m = _poisoned_step(d, cond, ups, gen, poison)
    assert m["skipped_nonfinite"] == 1.0 and not torch.isfinite(torch.tensor(m["grad_norm_student"]))
    assert not torch.isfinite(torch.tensor(m["grad_norm_fake"]))
    after = _adapters(d)
    assert _finite(after) and _same(before, after)  # weights untouched ...
    assert [u.optimizer.state_dict()["state"][0]["step"].item() for u in ups.values()] == adam_steps  # ... and Adam
    assert all(p.grad is None for r in ("student", "fake") for p in d.parameters(r))
    m = vsd_step(d, cond, ups["student"], ups["fake"], gen)  # and training goes on
    assert m["skipped_nonfinite"] == 0.0 and not _same(after, _adapters(d)) and _finite(_adapters(d))


def test_nonfinite_guard_counts_and_stops_after_n_in_a_row():
    g = NonFiniteGuard(3, total=2)
    with pytest.warns(UserWarning, match="not finite"):
        g.update({"skipped_nonfinite": 1.0}, 10)
        g.update({"skipped_nonfinite": 1.0}, 11)
    g.update({"skipped_nonfinite": 0.0}, 12)
    assert (g.total, g.in_a_row) == (4, 0)
    with pytest.warns(UserWarning, match="not finite"), \
            pytest.raises(NonFiniteTraining, match=r"3 VSD steps in a row .* \(vsd.gen_lr"):
        for step in (13, 14, 15):
            g.update({"skipped_nonfinite": 1.0}, step)


def test_train_local_counts_a_nan_batch_and_continues_then_stops_on_a_streak(sd_dir, tmp_path):
    teacher = load_teacher(sd_dir)
    encode, calls = teacher.encode_prompts, []

    def poisoned(prompts):  # the second training batch (2 prompts; the sample grid has 1)
        calls.extend([1] if len(prompts) == 2 else [])
        cond = encode(prompts)
        return _nan(cond) if len(prompts) == 2 and len(calls) == 2 else cond

    teacher.encode_prompts = poisoned
    vsd = VSDConfig(student=AdapterSpec("lorad", 4), fake=AdapterSpec("lorad", 2))
    cfg = LocalTrainConfig(teacher=str(sd_dir), vsd=vsd, steps=4, batch_size=2, sample_every=0, num_sample_prompts=1,
                           out_dir=str(tmp_path / "run"), max_nonfinite_in_a_row=2)
    with pytest.warns(UserWarning, match="VSD step 2: a loss or gradient was not finite"):
        result = train_local(cfg, teacher=teacher, progress=False, export=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped_nonfinite"] for x in lines] == [0.0, 1.0, 0.0, 0.0]
    assert [x["nonfinite_steps"] for x in lines] == [0, 1, 1, 1] and result["step"] == 4
    assert _finite(_adapters(result["distiller"]))
    from wadi_core.vsd import TrainState

    assert TrainState.load(tmp_path / "run" / "state").nonfinite_steps == 1

    teacher = load_teacher(sd_dir)  # resume the same out dir with every batch broken
    encode = teacher.encode_prompts
    teacher.encode_prompts = lambda prompts: _nan(encode(prompts))
    with warnings.catch_warnings(), pytest.raises(NonFiniteTraining, match="2 VSD steps in a row"):
        warnings.simplefilter("ignore")
        train_local(LocalTrainConfig(**{**cfg.__dict__, "steps": 10}), teacher=teacher, progress=False, export=False)


# -- DeepSpeed: one process, gloo world of 1 -----------------------------------------------------

@pytest.fixture(scope="module")
def ds_world():
    pytest.importorskip("deepspeed")
    from conftest import deepspeed_world_of_one

    with deepspeed_world_of_one():
        yield


def _engines(d: WaDiDistiller, stage: int, mixed_precision: str = "no") -> dict:
    import dataclasses

    from conftest import deepspeed_engines

    return deepspeed_engines(d, 2, stage, dataclasses.replace(d.cfg, mixed_precision=mixed_precision))


def _gathered(engines: dict, stage: int) -> dict[str, list[torch.Tensor]]:
    if stage != 3:
        return {r: [p.detach().float().clone() for p in e.module.parameters()] for r, e in engines.items()}
    import deepspeed

    out = {}
    for r, e in engines.items():
        with deepspeed.zero.GatheredParameters(list(e.module.parameters())):
            out[r] = [p.detach().float().clone() for p in e.module.parameters()]
    return out


@pytest.mark.parametrize("poison", ["loss", "gradient"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_updater_skips_a_nan_batch(sd_dir, ds_world, stage, poison):
    from pipelines.train.engines import DeepSpeedUpdater

    d = _distiller(sd_dir)
    engines = _engines(d, stage)
    ups = {r: DeepSpeedUpdater(e) for r, e in engines.items()}
    cond, gen = d.teacher.encode_prompts(PROMPTS), torch.Generator().manual_seed(0)
    m = vsd_step(d, cond, ups["student"], ups["fake"], gen)
    assert m["skipped_nonfinite"] == 0.0
    if stage > 0:  # our pre-step norm (partitions + all-reduce) is DeepSpeed's own
        assert m["grad_norm_fake"] == pytest.approx(float(engines["fake"].get_global_grad_norm()), rel=1e-4)
    before = _gathered(engines, stage)
    m = _poisoned_step(d, cond, ups, gen, poison)
    assert m["skipped_nonfinite"] == 1.0
    assert not any(torch.isfinite(torch.tensor(m[k])) for k in ("grad_norm_student", "grad_norm_fake"))
    after = _gathered(engines, stage)
    assert _finite(after) and _same(before, after)
    guard = NonFiniteGuard(5)
    with pytest.warns(UserWarning, match="VSD step 2: a loss or gradient was not finite"):
        guard.update(m, 2)
    assert guard.total == 1
    m = vsd_step(d, cond, ups["student"], ups["fake"], gen)  # training continues
    assert m["skipped_nonfinite"] == 0.0 and torch.isfinite(torch.tensor(m["grad_norm_student"]))
    later = _gathered(engines, stage)
    assert _finite(later) and not _same(after, later)


# -- checkpoints: safe loading, manifest, fallback -----------------------------------------------

def _save(d: WaDiDistiller, engines: dict, storage: Path, step: int) -> Path:
    from pipelines.train.checkpoint import TrainState, file_manifest, mark_complete, save_training_state

    name = f"checkpoint_{step:08d}"
    out = storage / "run" / name
    save_training_state(out, engines, TrainState(step=step), 0)
    mark_complete(str(storage), "run", name, file_manifest(out))
    return out


def _rewrite_manifest(ckpt: Path) -> None:
    """What an attacker with write access to the storage would do after replacing a file."""
    from pipelines.train.checkpoint import file_manifest, mark_complete

    mark_complete(str(ckpt.parent.parent), ckpt.parent.name, ckpt.name, file_manifest(ckpt))


@pytest.mark.parametrize("stage,precision", [(0, "no"), (1, "no"), (2, "no"), (2, "bf16"), (3, "no")])
def test_checkpoint_round_trip_with_weights_only_loading(sd_dir, ds_world, tmp_path, stage, precision):
    from pipelines.train.checkpoint import _SafeLoads, load_training_state, verify_checkpoint

    d = _distiller(sd_dir)
    engines = _engines(d, stage, precision)
    assert all(isinstance(e.checkpoint_engine, _SafeLoads) for e in engines.values())
    from pipelines.train.engines import DeepSpeedUpdater

    ups = {r: DeepSpeedUpdater(e) for r, e in engines.items()}
    vsd_step(d, d.teacher.encode_prompts(PROMPTS), ups["student"], ups["fake"], torch.Generator().manual_seed(0))
    saved = _gathered(engines, stage)
    ckpt = _save(d, engines, tmp_path, 1)
    assert json.loads((ckpt / "COMPLETE").read_text())["files"]["train_state.json"]["sha256"]
    assert not list(ckpt.glob("rng_rank*"))  # the VSD draws are keyed by sample: no RNG state to keep
    verify_checkpoint(ckpt)
    fresh = _distiller(sd_dir)  # ZeRO-3 cannot load into an engine that saved: new engines
    fresh_engines = _engines(fresh, stage, precision)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a verified checkpoint loads without warnings
        progress = load_training_state(ckpt, fresh_engines, 0)
    assert progress.step == 1 and _same(saved, _gathered(fresh_engines, stage))


class _Evil:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def test_a_crafted_pickle_in_the_deepspeed_state_is_refused_and_never_run(sd_dir, ds_world, tmp_path):
    import pickle

    from pipelines.train.checkpoint import UnsafeCheckpoint, load_training_state, verify_checkpoint

    d = _distiller(sd_dir)
    engines = _engines(d, 2)
    ckpt = _save(d, engines, tmp_path, 1)
    marker = tmp_path / "pwned"
    target = ckpt / "student" / "state" / "mp_rank_00_model_states.pt"
    for write in (lambda f: torch.save({"module": _Evil(marker)}, f),  # a torch zip archive
                  lambda f: f.write_bytes(pickle.dumps(_Evil(marker)))):  # a bare pickle
        write(target)
        _rewrite_manifest(ckpt)  # the manifest alone does not stop someone who can write storage
        with pytest.raises(UnsafeCheckpoint, match="refused to load .*mp_rank_00_model_states.pt.*Nothing in it was executed"):
            verify_checkpoint(ckpt)
        with pytest.raises(UnsafeCheckpoint, match="refused to load"):  # DeepSpeed's own reader is safe too
            load_training_state(ckpt, _engines(d, 2), 0, verify=False)
        assert not marker.exists()
    # Through DeepSpeed's own API on the engine (its checkpoint engine was replaced at build time).
    torch.save({"module": _Evil(marker)}, target)
    with pytest.raises(UnsafeCheckpoint, match="refused to load .*mp_rank_00_model_states.pt"):
        engines["student"].load_checkpoint(str(ckpt / "student"), tag="state")
    assert not marker.exists()


def test_manifest_catches_a_truncated_file_and_a_same_size_byte_flip(sd_dir, ds_world, tmp_path):
    from pipelines.train.checkpoint import CorruptCheckpoint, load_training_state

    d = _distiller(sd_dir)
    engines = _engines(d, 2)
    ckpt = _save(d, engines, tmp_path, 1)
    scalars = ckpt / "train_state.json"
    good = scalars.read_bytes()
    scalars.write_bytes(good[:-7])
    with pytest.raises(CorruptCheckpoint, match="train_state.json has .* bytes, the manifest says"):
        load_training_state(ckpt, engines, 0)
    scalars.write_bytes(good)
    states = ckpt / "student" / "state" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit, same size
    states.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="SHA-256 of student/state/mp_rank_00_model_states.pt differs"):
        load_training_state(ckpt, engines, 0)
    states.unlink()
    with pytest.raises(CorruptCheckpoint, match="mp_rank_00_model_states.pt is missing"):
        load_training_state(ckpt, engines, 0)


def _checkpoint_manager(d: WaDiDistiller, engines: dict, storage: Path, elastic: bool = False, ema=None):  # noqa: ANN001, ANN202
    """The worker's :class:`CheckpointManager` on a world of one, with ``storage/run`` as its run."""
    from types import SimpleNamespace

    from pipelines.train.checkpoint import model_fingerprint
    from pipelines.train.checkpoint_manager import CheckpointManager

    cfg = SimpleNamespace(train=SimpleNamespace(storage_path=str(storage), run_name="run", zero_stage=2,
                                                elastic=elastic), vsd=d.cfg)
    fingerprint = model_fingerprint("tiny", d.teacher.denoiser, {r: d.modules(r) for r in ("student", "fake")})
    return CheckpointManager(cfg, d, engines, ema, fingerprint, rank=0, world=1, device="cpu")


def test_the_checkpoint_manager_resumes_from_the_newest_good_checkpoint(sd_dir, ds_world, tmp_path, monkeypatch):
    """Saved through the worker's CheckpointManager (Ray's report and upload stood in for): resume
    takes the newest complete checkpoint, skips a damaged newest one (counted) and refuses to start
    over when every checkpoint is damaged."""
    ray_train = pytest.importorskip("ray.train")
    from pipelines.train.checkpoint import CheckpointRejected, TrainState, verify_checkpoint

    reports = []

    def report(metrics, checkpoint=None, checkpoint_dir_name=None, checkpoint_upload_fn=None):  # noqa: ANN001, ANN202
        reports.append((metrics["step"], checkpoint_dir_name))
        if checkpoint is not None:
            checkpoint_upload_fn(checkpoint, checkpoint_dir_name)

    monkeypatch.setattr(ray_train, "report", report)
    monkeypatch.setattr(ray_train, "get_checkpoint", lambda: None)
    d = _distiller(sd_dir)
    saver = _checkpoint_manager(d, _engines(d, 2), tmp_path)
    for step in (0, 3, 3, 6):  # step 0 and a step already saved: a report without a checkpoint
        saver.save(TrainState(step=step, fingerprint=saver.fingerprint), {"step": step})
    assert reports == [(0, None), (3, "checkpoint_00000003"), (3, None), (6, "checkpoint_00000006")]
    newest = tmp_path / "run" / "checkpoint_00000006"
    verify_checkpoint(newest)
    assert (newest / "adapters" / "student.safetensors").exists() and saver.seconds > 0

    fresh = TrainState(mlflow_run_id="fresh")
    manager = _checkpoint_manager(d, _engines(d, 2), tmp_path)
    assert manager.resume(fresh).step == 6 and manager.resumed_from == manager.last_saved_step == 6
    shard = newest / "student" / "state" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:10])  # the truncated upload of the issue
    manager = _checkpoint_manager(d, _engines(d, 2), tmp_path)
    with pytest.warns(UserWarning, match="skipping a checkpoint that failed verification.*mp_rank_00_model_states"):
        state = manager.resume(fresh)
    assert state.step == 3 and state.fingerprint == manager.fingerprint
    assert (manager.resumed_from, manager.corrupt_skipped, manager.tampered_skipped) == (3, 1, 0)
    # Every checkpoint damaged: an error that says so, not a silent start from step 0.
    old = tmp_path / "run" / "checkpoint_00000003" / "train_state.json"
    old.write_text(old.read_text().replace('"step": 3', '"step": 4'))
    with pytest.warns(UserWarning, match="skipping a checkpoint that failed verification"), \
            pytest.raises(CheckpointRejected, match="none of the run's 2 complete checkpoints"):
        _checkpoint_manager(d, _engines(d, 2), tmp_path).resume(fresh)
    # No checkpoint yet: the fresh state, nothing skipped.
    empty = _checkpoint_manager(d, _engines(d, 2), tmp_path / "empty")
    assert empty.resume(fresh) is fresh and (empty.resumed_from, empty.corrupt_skipped) == (0, 0)



def test_an_elastic_runs_checkpoint_holds_full_state_and_no_pickle(sd_dir, ds_world, tmp_path, monkeypatch):
    """train.min_workers: the CheckpointManager writes the full adapters and Adam moments as
    safetensors (loadable at any world size, tests/test_portable_state.py), no DeepSpeed .pt file
    and no RNG file, and resume restores the engines exactly."""
    ray_train = pytest.importorskip("ray.train")
    from pipelines.train.checkpoint import TrainState
    from pipelines.train.engines import DeepSpeedUpdater

    def report(metrics, checkpoint=None, checkpoint_dir_name=None, checkpoint_upload_fn=None):  # noqa: ANN001, ANN202
        if checkpoint is not None:
            checkpoint_upload_fn(checkpoint, checkpoint_dir_name)

    monkeypatch.setattr(ray_train, "report", report)
    monkeypatch.setattr(ray_train, "get_checkpoint", lambda: None)
    d = _distiller(sd_dir)
    engines = _engines(d, 2)
    ups = {r: DeepSpeedUpdater(e) for r, e in engines.items()}
    ema = AdapterEMA(d.parameters("student"), 0.9)
    vsd_step(d, d.teacher.encode_prompts(PROMPTS), ups["student"], ups["fake"], torch.Generator().manual_seed(0))
    ema.update()
    saver = _checkpoint_manager(d, engines, tmp_path, elastic=True, ema=ema)
    saver.save(TrainState(step=1, fingerprint=saver.fingerprint), {"step": 1})
    ckpt = tmp_path / "run" / "checkpoint_00000001"
    files = sorted(str(f.relative_to(ckpt)) for f in ckpt.rglob("*") if f.is_file())
    assert "full_state/student.safetensors" in files and "full_state/fake.safetensors" in files
    assert not [f for f in files if f.endswith(".pt") or "rng" in f], files
    fresh_d = _distiller(sd_dir)
    fresh = _engines(fresh_d, 2)
    fresh_ema = AdapterEMA(fresh_d.parameters("student"), 0.9)
    manager = _checkpoint_manager(fresh_d, fresh, tmp_path, elastic=True, ema=fresh_ema)
    assert manager.resume(TrainState()).step == 1
    saved_ema, loaded_ema = ema.state_dict(), fresh_ema.state_dict()  # the student EMA too
    assert saved_ema.keys() == loaded_ema.keys() and all(torch.equal(saved_ema[k], loaded_ema[k]) for k in saved_ema)
    assert _same(_gathered(engines, 2), _gathered(fresh, 2))
    for role in ("student", "fake"):  # the Adam moments too
        a, b = engines[role].optimizer, fresh[role].optimizer
        sa = [v for st in a.optimizer.state.values() for k, v in sorted(st.items()) if k != "step"]
        sb = [v for st in b.optimizer.state.values() for k, v in sorted(st.items()) if k != "step"]
        assert sa and all(torch.equal(x, y) for x, y in zip(sa, sb, strict=True))

# -- MLflow: a failed resume does not un-finish a finished run ----------------------------------

def test_failed_resume_keeps_a_finished_mlflow_run_finished(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from pipelines.tracking.client import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run("exp", run_name="r", tracking_uri=uri) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=1)
    run_id = tracker.run_id
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    with pytest.raises(RuntimeError, match="boom"):
        with start_run("exp", tracking_uri=uri, run_id=run_id):
            raise RuntimeError("resume boom")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "resume boom" in run.data.tags["wadi.last_resume_error"]
    with pytest.raises(RuntimeError, match="^boom$"):  # a run that never finished still ends FAILED
        with start_run("exp", run_name="fresh", tracking_uri=uri) as fresh:
            raise RuntimeError("boom")
    assert client.get_run(fresh.run_id).info.status == "FAILED"
