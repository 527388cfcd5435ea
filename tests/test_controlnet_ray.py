"""ControlNet training through Ray Train on an image lake (pipelines/train/controlnet.py,
pipelines/data/control_lake.py): what a lake holds and drops, the optimizer state without pickle, and
`jobs/controlnet.py trainer=ray` on 2 workers with a corrupt shard, resumed by a second run."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from pipelines.data.control_lake import CONTROL_BAD_REASONS, decode_rows, parse_control_tar, write_control_shards
from wadi_core.prompts.shards import bad_code


def _samples(n: int, seed: int = 0):
    from wadi_core.downstream.controlnet import domain_control_samples

    return list(domain_control_samples(n, seed, 32))


def _tar(members: dict[str, bytes]) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_control_lake_keeps_good_samples_and_counts_the_rest(tmp_path):
    samples = _samples(10)
    paths = write_control_shards(tmp_path / "lake", samples, per_shard=6)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar"]
    rows, bad = parse_control_tar(paths[0].read_bytes())
    assert len(rows) == 6 and not any(bad.values())
    images, masks, captions, dropped = decode_rows({k: np.array([r[k] for r in rows], dtype=object)
                                                    for k in ("image", "control", "caption")} | {"bad": np.zeros(6)})
    key, image, mask, caption = samples[0]
    assert np.array_equal(images[0], image) and captions[0] == caption  # PNG is lossless
    np.testing.assert_allclose(masks[0], mask / 255.0, atol=1e-7)
    assert not any(dropped.values())

    # a shard cut off mid-file keeps what came before the damage and counts one corrupt shard
    raw = paths[0].read_bytes()
    rows, bad = parse_control_tar(raw[: len(raw) // 2])
    assert bad["corrupt_shard"] == 1 and 0 < len(rows) < 6
    # a sample without its control image, and one whose image is not a PNG
    crafted = _tar({"a.png": rows[0]["image"], "a.txt": b"no control",
                    "b.png": b"\x89PNG not really", "b.control.png": rows[0]["control"], "b.txt": b"broken"})
    rows, bad = parse_control_tar(crafted)
    assert bad["incomplete_sample"] == 1 and len(rows) == 1
    batch = {"image": np.array([rows[0]["image"], b""], dtype=object),
             "control": np.array([rows[0]["control"], b""], dtype=object),
             "caption": np.array(["broken", ""], dtype=object),
             "bad": np.array([0, bad_code("unreadable_shard", CONTROL_BAD_REASONS)])}
    images, _, captions, dropped = decode_rows(batch)
    assert len(captions) == 0 and dropped["undecodable_image"] == 1 and dropped["unreadable_shard"] == 1


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    from pipelines.train.controlnet import load_optimizer, save_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    save_optimizer(opt, tmp_path / "opt.safetensors")
    copy = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    copy.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(copy.parameters(), lr=123.0)
    load_optimizer(opt2, tmp_path / "opt.safetensors")
    assert opt2.param_groups[0]["lr"] == 1e-2
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (copy, opt2)):  # the same next step from the restored moments
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), copy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.ray
def test_controlnet_job_trains_on_ray_workers_and_resumes(ray_local, tmp_path, monkeypatch):
    import mlflow

    from jobs import controlnet as job
    from pipelines.train.controlnet import RayControlNetSpec, run_controlnet_training
    from wadi_core.downstream.controlnet import ControlNetConfig, build_controlnet, load_controlnet
    from wadi_core.export import export_one_step_pipeline
    from wadi_core.models import load_teacher
    from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller

    torch.manual_seed(0)  # the distiller adds its adapters to the UNet it is given: not the one compared below
    student = export_one_step_pipeline(WaDiDistiller(load_teacher("embedded"), VSDConfig(
        student=AdapterSpec("lorad", 2), fake=AdapterSpec("lorad", 2))), tmp_path / "student")
    teacher = load_teacher("embedded")
    lake = tmp_path / "lake"
    paths = write_control_shards(lake, _samples(48), per_shard=16)
    raw = paths[-1].read_bytes()
    (lake / "shard-000003.tar").write_bytes(raw[: len(raw) // 3])  # a damaged shard in the lake
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "cn"
    monkeypatch.chdir(tmp_path)  # a relative out= (and so a relative Ray storage path), as users type it
    result = job.main([f"student={student}", "trainer=ray", "workers=2", "cpus_per_worker=0.5", "lake=lake",
                       "steps=8", "batch_size=8", "checkpoint_every=4", "eval_prompts=2", "teacher_steps=2",
                       "fid_reference=0", "timing_batch=1", "baselines=false", "out=cn", f"tracking_uri={uri}",
                       "threads=1"])
    assert result["train"]["train_steps"] == 8 and result["train"]["resumed_from_step"] == 0
    # 8 steps of 4 rows per worker go once through the 48 good rows: the damaged shard was met, counted, not fatal
    assert result["train"]["data/bad_corrupt_shard"] >= 1
    trained = load_controlnet(out / "controlnet")
    zero_convs = [k for k in build_controlnet(teacher).state_dict() if k.startswith("controlnet_down_blocks")]
    assert all(not build_controlnet(teacher).state_dict()[k].any() for k in zero_convs)  # zero at the start
    assert any(trained.state_dict()[k].any() for k in zero_convs)  # trained by the workers
    run = mlflow.MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.data.params["trainer"] == "ray" and "controlnet/loss" in run.data.metrics  # logged by rank 0
    assert run.data.metrics["data/bad_corrupt_shard"] >= 1
    assert {a.path for a in mlflow.MlflowClient(uri).list_artifacts(run.info.run_id)} >= {"grid.png", "controlnet"}

    # the same run name and storage again, with more steps: Ray Train hands the newest checkpoint back
    cfg = ControlNetConfig(steps=10, batch_size=8)
    spec = RayControlNetSpec(lake=str(lake), workers=2, cpus_per_worker=0.5, storage_path=str(out / "ray"),
                             run_name="controlnet-cn", checkpoint_every=4)
    again, metrics = run_controlnet_training(cfg, spec)
    assert metrics["resumed_from"] == 8 and metrics["step"] == 10
    assert metrics["data/bad_corrupt_shard"] >= 1  # the counts of the first run carry over
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in again.state_dict().items())


def test_ray_workers_must_leave_a_cpu_to_ray_data():
    from pipelines.runtime.preflight import check_worker_cpus
    from wadi_core.config import ConfigError

    check_worker_cpus(2, 0.5, 2.0, keys=("workers", "cpus_per_worker"))
    with pytest.raises(ConfigError, match=r"workers x cpus_per_worker = 2 x 1 .* lower cpus_per_worker \(e.g. 0.5\)"):
        check_worker_cpus(2, 1.0, 2.0, keys=("workers", "cpus_per_worker"))
    with pytest.warns(UserWarning, match="autoscaling"):
        check_worker_cpus(2, 1.0, 2.0, strict=False)
