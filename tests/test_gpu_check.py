"""benchmarks/gpu_check.py needs only torch + diffusers (+ transformers): its smoke mode runs
with ray, deepspeed and mlflow made uninstalled (as on the GPU machine), and the pipeline's other
dependencies (S3, Arrow, SciPy, plotting) too, every section included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Makes the packages look uninstalled to this interpreter and every child process: the path
# finder does not see them (find_spec -> None, import -> ModuleNotFoundError), as on a machine
# that never installed them.
SITECUSTOMIZE = '''
import importlib.machinery
BLOCKED = {"ray", "deepspeed", "mlflow", "s3fs", "boto3", "botocore", "pyarrow", "scipy", "matplotlib",
           "webdataset"}
_find_spec = importlib.machinery.PathFinder.find_spec.__func__
def find_spec(cls, fullname, path=None, target=None):
    if fullname.split(".")[0] in BLOCKED:
        return None
    return _find_spec(cls, fullname, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
'''


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}


def test_the_blocker_hides_ray_deepspeed_and_mlflow(tmp_path: Path) -> None:
    env = _blocked_env(tmp_path)
    for name in ("ray", "deepspeed", "mlflow"):
        res = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, name


@pytest.mark.slow
def test_gpu_check_smoke_runs_without_ray_deepspeed_mlflow(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke"], cwd=tmp_path,
                         env=_blocked_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    table = res.stdout
    for section in ("vsd", "adapters", "collectives", "generation"):
        assert f"\n{section} " in table, f"section {section} missing:\n{table}"
    assert "answers right" in table and "images/s" in table and "peak memory shared / three copies" in table
