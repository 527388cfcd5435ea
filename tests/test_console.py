"""The quiet console (pipelines/runtime/console.py): the terminal gets the lines meant for a person, the
log file gets everything, child processes included. A whole job's console (at most 40 lines, each
for a person) is checked in tests/test_run_trust_ray.py (job E)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_keep_on_console_picks_the_lines_for_a_person() -> None:
    from pipelines.runtime.console import keep_on_console

    assert keep_on_console("[wadi] data: 20,000 prompts\n")
    assert keep_on_console("\x1b[36m(RayTrainWorker pid=42)\x1b[0m [wadi] step 90/900 | loss_gen 0.1\n")
    assert keep_on_console("(RayTrainWorker pid=42, ip=10.0.0.2) [wadi] stop requested\n")
    assert keep_on_console("/repo/pipelines/runtime/lease.py:170: UserWarning: taking over the lease\n")
    assert keep_on_console("(pid=7) /x/wadi_core/storage.py:12: UserWarning: retrying\n")
    for noise in ("(RayTrainWorker pid=42) Reporting training result 1: TrainingReport(...)\n",
                  "2026-12-06 13:52:02,443\tINFO worker.py:1 -- Started a local Ray instance.\n",
                  "/venv/site-packages/torch/distributed/c10d_logger.py:83: FutureWarning: deprecated\n",
                  "vsd rank 0:  29%|██▉       | 261/900 [06:22<28:34,  2.68s/it]\r\n", "\n"):
        assert not keep_on_console(noise), noise


SCRIPT = r"""
import subprocess, sys, warnings
from pipelines.runtime.console import quiet_console, say
with quiet_console(sys.argv[1], verbose=sys.argv[2] == "1"):
    say("[wadi] phase one")
    print("library noise", flush=True)
    subprocess.run([sys.executable, "-c",
                    "import sys; print('child noise'); print('(Worker pid=3) [wadi] step 5/10'); "
                    "print('(Worker pid=3) [wadi] step 5/10'); "
                    "sys.stderr.write('child err noise\\n')"], check=True)
    warnings.warn_explicit("ours", UserWarning, "/x/pipelines/run.py", 7)
    warnings.warn_explicit("theirs", FutureWarning, "/x/site-packages/torch/a.py", 7)
    say("failed: the message", err=True)
print("after the block")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_console_filters_the_terminal_and_logs_everything(tmp_path: Path, verbose: bool) -> None:
    log = tmp_path / "job.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    everything = log.read_text()
    for line in ("[wadi] phase one", "library noise", "child noise", "[wadi] step 5/10", "child err noise",
                 "UserWarning: ours", "FutureWarning: theirs", "failed: the message"):
        assert line in everything, line
    if verbose:
        assert "library noise" in proc.stdout and "child err noise" in proc.stdout + proc.stderr
        return
    assert proc.stdout.splitlines() == ["[wadi] phase one", "[wadi] step 5/10",
                                        "/x/pipelines/run.py:7: UserWarning: ours", "after the block"]
    assert proc.stderr.splitlines() == ["failed: the message"]


def test_the_result_names_the_run_page_in_the_mlflow_ui() -> None:
    from pipelines.run import DistillResult

    local = DistillResult("r", "sqlite:////x/mlflow.db", "abc", "/e", None, {"step": 3}, mlflow_experiment_id="7")
    assert "run page          http://127.0.0.1:5000/#/experiments/7/runs/abc" in local.summary()
    assert "mlflow ui --backend-store-uri sqlite:////x/mlflow.db" in local.summary()
    server = DistillResult("r", "https://u:secret@mlflow.example:5000/", "abc", "/e", None, mlflow_experiment_id="7")
    assert server.run_page() == "https://***@mlflow.example:5000/#/experiments/7/runs/abc"
    assert DistillResult("r", "sqlite:///x", None, "/e", None).run_page() is None  # untracked
