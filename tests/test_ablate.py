"""The claims ablation: smoke run of jobs/ablate.py on a tiny teacher, plus the verdict rules."""

from __future__ import annotations

import csv
import importlib
import json
import math
from pathlib import Path

import pytest
import torch

from experiments.ablation import AblationConfig, choose_lr, summarize, verdicts

REPO = Path(__file__).resolve().parents[1]


def _job():
    return importlib.import_module("jobs.ablate")


def _rows(tmp: Path, kind: str) -> list[dict]:
    with open(tmp / kind) as f:
        return list(csv.DictReader(f))


def _unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=1, keepdim=True)


@pytest.mark.slow
def test_smoke_ablation_writes_table_csv_plots_and_swaps(tmp_path):
    from safetensors.torch import load_file

    from wadi_core.adapters import resolve_targets
    from wadi_core.models.tiny import save_tiny_pipeline

    teacher_dir = save_tiny_pipeline(tmp_path / "teacher", "sd")
    out = tmp_path / "ablation"
    docs = tmp_path / "docs_images"
    job = _job()
    argv = ["--budget", "smoke", f"teacher={teacher_dir}", f"out_dir={out}", "--quiet",
            f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"docs_images={docs}"]
    result = job.main(argv)

    # Table, CSVs, plots.
    summary = _rows(out, "summary.csv")
    by = {(r["section"], r["label"]): r for r in summary}
    assert {"lorad r4", "lora r4", "full"} <= {r["label"] for r in summary if r["section"] == "adapters"}
    assert [r["label"] for r in summary if r["section"] == "rank"] == ["lorad r2", "lorad r4"]
    teacher_1step = {r["label"]: r for r in summary if r["section"] == "baseline"}
    assert "teacher 1-step, no CFG (the student at init)" in teacher_1step  # what the student starts from
    assert {r["label"] for r in summary if r["section"] == "swaps"} == {
        "full fine-tune", "teacher norms (swap-norm)", "teacher directions (swap-direction)"}
    for key in [("adapters", "lorad r4"), ("adapters", "lora r4"), ("adapters", "full"), ("rank", "lorad r2")]:
        row = by[key]
        assert row["n_seeds"] == "2" and row["seeds"] == "0 1"
        assert math.isfinite(float(row["fid_mean"])) and float(row["fid_mean"]) > 0
        assert math.isfinite(float(row["fid_sd"])) and 0 <= float(row["alignment_mean"]) <= 1
        assert 0 <= float(row["precision_mean"]) <= 1 and 0 <= float(row["recall_mean"]) <= 1
        assert float(row["s_per_step"]) > 0
    results = _rows(out, "results.csv")
    assert {"name", "kind", "rank", "lr", "seed", "params", "fid", "precision", "recall", "alignment", "s_per_step",
            "cpu_s_per_step", "dir_change_pct", "norm_change_pct"} <= set(results[0])
    # Fresh real renders fall inside the real reference's k-NN balls: the precision wiring works.
    floor = next(r for r in results if r["name"] == "real_floor")
    assert float(floor["precision"]) >= 0.5 and float(floor["fid"]) >= 0
    md = (out / "ablation.md").read_text()
    assert "| FID | precision | recall | alignment |" in md
    assert "## Adapter comparison" in md and "## LoRaD rank sweep" in md and md.count("- **") == 4
    for name in ("ablation_adapters.png", "ablation_params_fid.png", "ablation_rank.png", "ablation_swaps.png",
                 "ablation_lr_sweep.png", "ablation_weights_scatter.png"):
        assert (docs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(result["report"]["verdicts"]) == 4

    # Trainable parameters: LoRaD r*(out + in/2), LoRA r*(out + in) on the student layers.
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(teacher_dir / "unet")
    layers = [unet.get_submodule(n) for n in resolve_targets(unet, "unet_student")]
    lorad4 = sum(4 * (m.out_features + m.in_features // 2) for m in layers)
    lora4 = sum(4 * (m.out_features + m.in_features) for m in layers)
    assert int(by[("adapters", "lorad r4")]["params"]) == lorad4 < int(by[("adapters", "lora r4")]["params"]) == lora4
    assert int(by[("rank", "lorad r2")]["params"]) == lorad4 // 2
    # LoRaD keeps every row norm: its norm change is float rounding only.
    assert float(by[("adapters", "lorad r4")]["norm_change_pct"]) < 1e-4

    # Swap checkpoints: per row, swap-direction = teacher direction x student norm, swap-norm the reverse.
    wdir = next((out / "weights").glob("full_*seed0*"))
    student = load_file(str(wdir / "student_full.safetensors"))
    to_dir, to_norm = load_file(str(wdir / "swap_direction.safetensors")), load_file(str(wdir / "swap_norm.safetensors"))
    base = {k: v for k, v in unet.state_dict().items()}
    weight_keys = [k for k in student if k.endswith(".weight")]
    assert weight_keys and len(weight_keys) == len(layers)
    moved = 0.0
    for k in weight_keys:
        t, s = base[k].double(), student[k].double()
        moved = max(moved, float((1 - (_unit_rows(t) * _unit_rows(s)).sum(1)).max()))
        torch.testing.assert_close(_unit_rows(to_dir[k].double()), _unit_rows(t), atol=1e-6, rtol=0)
        torch.testing.assert_close(to_dir[k].double().norm(dim=1), s.norm(dim=1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(_unit_rows(to_norm[k].double()), _unit_rows(s), atol=1e-6, rtol=0)
        torch.testing.assert_close(to_norm[k].double().norm(dim=1), t.norm(dim=1), atol=1e-6, rtol=1e-5)
        bias = k[:-len("weight")] + "bias"
        if bias in student:
            assert torch.equal(to_dir[bias], student[bias])
    assert moved > 0  # the full fine-tune did move away from the teacher
    swap_rows = [r for r in results if r["variant"] == "swap_direction"]
    assert len(swap_rows) == 2 and all(float(r["dir_change_pct"]) < 1e-6 for r in swap_rows)

    # MLflow: a parent run with nested runs per row.
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(
        [mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("wadi-ablation").experiment_id])
    assert len(runs) > 10 and any("fid" in r.data.metrics for r in runs)

    # Rerunning the same command continues (nothing to do); another configuration is refused.
    n_rows = len((out / "results.jsonl").read_text().splitlines())
    job.main(argv[:-2] + ["track=false"])
    assert len((out / "results.jsonl").read_text().splitlines()) == n_rows
    walls = json.loads((out / "wall_time.json").read_text())["invocations_s"]
    assert len(walls) == 2 and all(w > 0 for w in walls)  # a continued run reports the time of both
    with pytest.raises(ValueError, match="another configuration"):
        job.main(argv[:-2] + ["track=false", "budget.steps=3"])


def _row(**kw) -> dict:
    base = {"group": "adapter", "variant": "student", "evalset": "test", "steps": 10, "rank": 4, "lr": 1e-3,
            "alignment": 0.5, "all_correct": 0.1}
    return {**base, **kw}


def test_verdict_rules_follow_the_numbers():
    cfg = AblationConfig(kinds=("lorad", "lora", "full"), rank=4, ranks=(4,), budget=AblationConfig().budget.__class__(steps=10))
    rows = [_row(name="t", group="baseline", variant="teacher_25step", kind="teacher", fid=10.0, evalset=None)]
    fids = {"lorad": (10.0, 10.4), "lora": (15.0, 15.2), "full": (14.0, 14.4)}
    params = {"lorad": 100, "lora": 200, "full": 1000}
    for kind, pair in fids.items():
        for seed, fid in enumerate(pair):
            rows.append(_row(name=f"{kind}{seed}", kind=kind, seed=seed, fid=fid, params=params[kind],
                             dir_change_pct=2.0, norm_change_pct=0.1, svd_energy_30pct=0.9))
    for seed in (0, 1):
        rows.append(_row(name=f"sn{seed}", group="swap", variant="swap_norm", kind="full", seed=seed, fid=14.3))
        rows.append(_row(name=f"sd{seed}", group="swap", variant="swap_direction", kind="full", seed=seed, fid=80.0))
    v = {c.split()[0]: verdict for c, verdict, _ in verdicts(summarize(rows, cfg))}
    assert v["LoRaD"] == "holds"
    assert v["Distillation"].startswith("holds")  # 2.0 / 0.1 = 20x
    assert v["Teacher"] == "holds"
    assert v["The"].startswith("holds: close")  # 10.2 vs 10.0

    # LoRaD worse than LoRA by far more than the spread; directions barely changed; swaps flat.
    for r in rows:
        if r["kind"] == "lorad":
            r["fid"] += 10
        if r["kind"] == "full" and r["variant"] == "student":
            r["dir_change_pct"] = 0.05
        if r["variant"] == "swap_direction":
            r["fid"] = 14.3
    v = {c.split()[0]: verdict for c, verdict, _ in verdicts(summarize(rows, cfg))}
    assert v["LoRaD"].startswith("does not hold")
    assert v["Distillation"] == "does not hold"
    assert v["Teacher"].startswith("half holds: teacher norms harmless")
    assert v["The"].startswith("does not hold")


def test_choose_lr_ignores_diverged_runs():
    rows = [{"group": "lr_sweep", "variant": "student", "kind": "lora", "lr": lr, "fid": fid}
            for lr, fid in [(1e-4, 30.0), (1e-3, 20.0), (1e-2, float("nan"))]]
    assert choose_lr(rows, "lora") == 1e-3
    assert choose_lr(rows, "dora") is None
