"""Weight-direction analysis: per-row maths, swaps, and the analyze_weights job end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wadi_core.analysis import (compare_weights, load_weights, locate_weights, residual_svd_energy, row_changes,
                                swap_direction, swap_norm)


def _unit_rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(t.shape[0], -1).double()
    return t / t.norm(dim=1, keepdim=True)


def test_row_changes_known_values() -> None:
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    ang = 0.3
    wc = torch.stack([w[0] * 1.1,                                            # norm +10 %, same direction
                      torch.tensor([math.cos(ang), math.sin(ang)]),            # rotated, same norm
                      torch.tensor([0.0, -1.0])])                              # flipped, half norm
    d_norm, d_dir = row_changes(w, wc)
    torch.testing.assert_close(d_norm, torch.tensor([0.1, 0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(d_dir, torch.tensor([0.0, 1 - math.cos(ang), 2.0], dtype=torch.float64))


def test_conv_kernels_are_flattened_rows_and_summary_is_mean_over_layers() -> None:
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(6, 3, 3, 3, generator=g)
    lin = torch.randn(5, 8, generator=g)
    ref = {"conv.weight": conv, "lin.weight": lin, "lin.bias": torch.zeros(5)}
    cand = {"conv.weight": conv * 1.02, "lin.weight": lin + 0.1 * torch.randn(5, 8, generator=g),
            "lin.bias": torch.ones(5)}
    cmp = compare_weights(ref, cand, svd_fraction=0.3, progress=False)
    assert [l.name for l in cmp.layers] == ["conv.weight", "lin.weight"]  # 1D bias ignored
    conv_l, lin_l = cmp.layers
    assert conv_l.rows == 6 and conv_l.norm_mean_pct == pytest.approx(2.0, rel=1e-5) and conv_l.dir_mean_pct < 1e-9
    assert math.isnan(conv_l.svd_energy)  # pure rescaling: no direction residual
    dn, dd = row_changes(lin, cand["lin.weight"])
    assert lin_l.dir_mean_pct == pytest.approx(float(dd.mean() * 100))
    assert lin_l.norm_std_pct == pytest.approx(float(np.std(dn.numpy() * 100)))
    s = cmp.summary()
    assert s["direction_change_mean_pct"] == pytest.approx((conv_l.dir_mean_pct + lin_l.dir_mean_pct) / 2)
    assert s["norm_change_mean_pct"] == pytest.approx((conv_l.norm_mean_pct + lin_l.norm_mean_pct) / 2)
    assert len(cmp.row_dir_pct) == 11


def test_residual_svd_energy() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 30, generator=g)
    u, v = torch.randn(20, 1, generator=g), torch.randn(1, 30, generator=g)
    # a rank-one change of the unit directions is kept whole by any rank fraction
    wc = _unit_rows(w).float() + 0.05 * u @ v
    wc = wc * w.norm(dim=1, keepdim=True)
    resid = _unit_rows(wc) - _unit_rows(w)
    s2 = torch.linalg.svdvals(resid) ** 2
    e = residual_svd_energy(w, wc, 0.3)
    assert e == pytest.approx(float(s2[:6].sum() / s2.sum()), rel=1e-6)
    noisy = w + torch.randn(20, 30, generator=g)
    assert 0.3 < residual_svd_energy(w, noisy, 0.3) < 0.9
    assert math.isnan(residual_svd_energy(w, w * 2, 0.3))


@pytest.mark.parametrize("shape", [(7, 9), (4, 3, 3, 3)])
def test_swaps_take_exactly_the_other_norm_or_direction(shape) -> None:
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g) * 2
    d = swap_direction(student, teacher)
    torch.testing.assert_close(_unit_rows(d), _unit_rows(teacher), rtol=0, atol=1e-6)
    torch.testing.assert_close(d.reshape(shape[0], -1).norm(dim=1), student.reshape(shape[0], -1).norm(dim=1))
    n = swap_norm(student, teacher)
    torch.testing.assert_close(_unit_rows(n), _unit_rows(student), rtol=0, atol=1e-6)
    torch.testing.assert_close(n.reshape(shape[0], -1).norm(dim=1), teacher.reshape(shape[0], -1).norm(dim=1))


# --- the job on two tiny saved UNets ------------------------------------------------------------------


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)


@pytest.fixture(scope="module")
def unet_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny UNet and a copy whose weights mostly turned (direction) and barely grew (norm)."""
    root = tmp_path_factory.mktemp("unets")
    ref = _tiny_unet()
    ref.save_pretrained(root / "teacher" / "unet")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim >= 2:
                rows = p.reshape(p.shape[0], -1)
                norm = rows.norm(dim=1, keepdim=True)
                turned = rows + 0.15 * norm / math.sqrt(rows.shape[1]) * torch.randn(rows.shape, generator=g)
                turned = turned / turned.norm(dim=1, keepdim=True) * norm * 1.001
                p.copy_(turned.reshape(p.shape))
    ref.save_pretrained(root / "student" / "unet")
    return root / "teacher" / "unet", root / "student" / "unet"


def test_job_on_model_dirs_with_direction_swap(unet_pair, tmp_path) -> None:
    from jobs.analyze_weights import main

    teacher, student = unet_pair
    out = tmp_path / "analysis"
    summary = main([f"reference={teacher}", f"candidate={student}", f"out={out}", "swap=direction"])
    for f in ("summary.json", "per_layer.csv", "layer_scatter.png", "histograms.png", "svd_energy.png"):
        assert (out / f).stat().st_size > 0, f
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["direction_change_mean_pct"] == pytest.approx(summary["direction_change_mean_pct"])
    assert summary["norm_change_mean_pct"] == pytest.approx(0.1, rel=1e-3)  # the fixture's x1.001
    assert summary["direction_change_mean_pct"] > 5 * summary["norm_change_mean_pct"]
    assert 0 < summary["svd_energy_kept_mean"] < 1
    with open(out / "per_layer.csv") as f:
        rows = list(csv.DictReader(f))
    ref_state = load_weights(locate_weights(teacher))
    assert len(rows) == summary["layers"] == sum(1 for v in ref_state.values() if v.ndim >= 2)

    # the swapped checkpoint is a loadable diffusers model dir with the teacher's directions exactly
    from diffusers import UNet2DConditionModel

    swapped_dir = Path(summary["swap_out"])
    assert (swapped_dir / "config.json").exists()
    swapped = UNet2DConditionModel.from_pretrained(swapped_dir).state_dict()
    cand_state = load_weights(locate_weights(student))
    for k, v in ref_state.items():
        if v.ndim >= 2:
            torch.testing.assert_close(_unit_rows(swapped[k]), _unit_rows(v), rtol=0, atol=1e-6, msg=k)
            torch.testing.assert_close(swapped[k].reshape(v.shape[0], -1).norm(dim=1),
                                       cand_state[k].reshape(v.shape[0], -1).norm(dim=1), msg=k)
        else:
            assert torch.equal(swapped[k], cand_state[k]), k
    back = compare_weights(ref_state, load_weights(locate_weights(swapped_dir)), svd_fraction=None,
                           progress=False).summary()
    assert back["direction_change_mean_pct"] < 1e-4


@pytest.mark.slow  # MLflow sqlite set-up alone takes ~10 s here
def test_job_on_safetensors_files_with_norm_swap_and_mlflow(unet_pair, tmp_path) -> None:
    from jobs.analyze_weights import main

    teacher, student = unet_pair
    swap_out = tmp_path / "student_teacher_norms.safetensors"
    db = tmp_path / "mlflow.db"
    summary = main([f"reference={teacher / 'diffusion_pytorch_model.safetensors'}",
                    f"candidate={student / 'diffusion_pytorch_model.safetensors'}",
                    f"out={tmp_path / 'a'}", "swap=norm", f"swap_out={swap_out}", "svd_fraction=null",
                    "plots=false", f"tracking_uri=sqlite:///{db}", "experiment=wa-test"])
    assert "svd_energy_kept_mean" not in summary
    swapped = load_weights(locate_weights(swap_out))
    ref = load_weights(locate_weights(teacher))
    after = compare_weights(ref, swapped, svd_fraction=None, progress=False).summary()
    assert after["norm_change_mean_pct"] < 1e-4
    assert after["direction_change_mean_pct"] == pytest.approx(summary["direction_change_mean_pct"], rel=1e-3)

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("wa-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["direction_change_mean_pct"] == pytest.approx(summary["direction_change_mean_pct"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "analysis")} >= {"analysis/summary.json"}


def test_job_reads_and_writes_s3(unet_pair, s3_bucket, tmp_path) -> None:
    from jobs.analyze_weights import main
    from wadi_core import storage

    teacher, student = unet_pair
    storage.upload_dir(teacher, f"s3://{s3_bucket}/teacher/unet")
    storage.upload_dir(student, f"s3://{s3_bucket}/student/unet")
    summary = main([f"reference=s3://{s3_bucket}/teacher/unet", f"candidate=s3://{s3_bucket}/student/unet",
                    f"out=s3://{s3_bucket}/analysis", "swap=direction", "svd_fraction=null", "plots=false",
                    f"cache_dir={tmp_path / 'cache'}"])
    files = {Path(f).name for f in storage.list_files(f"s3://{s3_bucket}/analysis")}
    assert {"summary.json", "per_layer.csv", "diffusion_pytorch_model.safetensors", "config.json"} <= files
    assert summary["swap_out"] == f"s3://{s3_bucket}/analysis/swapped_direction"
