"""wadi_core is pure PyTorch + diffusers: every module imports with ray, deepspeed and mlflow absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import importlib, pkgutil, sys
for banned in ("ray", "deepspeed", "mlflow"):
    sys.modules[banned] = None  # any `import ray` now raises ImportError
import wadi_core
names = [m.name for m in pkgutil.walk_packages(wadi_core.__path__, "wadi_core.")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def test_wadi_core_imports_without_ray_deepspeed_mlflow():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) > 20  # it really walked the package
