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


# The core's own layers, lowest first: a module may import its own unit and lower layers only,
# at module level or inside a function alike (a lazy import is still a dependency).
CORE_LAYERS: list[set[str]] = [
    {"config", "storage", "images", "__init__"},
    {"metrics", "adapters", "analysis"},
    {"domain"},
    {"models", "prompts", "assets"},
    {"vsd"},
    {"export", "export_formats"},
    {"local_train", "downstream"},
]


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (relative imports resolved)."""
    import ast

    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ((node.module,) if node.module else ()))
                out.update([mod] if node.module else [f"{mod}.{a.name}" for a in node.names])
            else:
                out.add(node.module or "")
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_core_imports_only_downwards():
    layer_of = {u: i for i, units in enumerate(CORE_LAYERS) for u in units}
    files = sorted((ROOT / "wadi_core").rglob("*.py"))
    units = {_unit(".".join(f.relative_to(ROOT).with_suffix("").parts)) for f in files}
    assert units <= set(layer_of), f"place these wadi_core modules in CORE_LAYERS: {sorted(units - set(layer_of))}"
    bad = []
    for f in files:
        me = _unit(".".join(f.relative_to(ROOT).with_suffix("").parts))
        for mod in _imports(f):
            top = mod.split(".")[0]
            if top in ("pipelines", "jobs", "experiments", "benchmarks", "tests"):
                bad.append(f"{f.relative_to(ROOT)} imports {mod} (the core is a library)")
            elif top == "wadi_core" and mod != "wadi_core":
                other = _unit(mod)
                if other != me and layer_of.get(other, -1) > layer_of[me]:
                    bad.append(f"{f.relative_to(ROOT)} ({me}) imports {mod} from a higher layer")
    assert not bad, "\n".join(bad)


def test_pipelines_do_not_import_jobs_or_experiments():
    bad = [f"{f.relative_to(ROOT)} imports {mod}" for f in sorted((ROOT / "pipelines").rglob("*.py"))
           for mod in _imports(f) if mod.split(".")[0] in ("jobs", "experiments", "benchmarks")]
    assert not bad, "\n".join(bad)
