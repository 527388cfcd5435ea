"""Ray Data API usage: actor pools through ``compute=ActorPoolStrategy(...)``, not ``concurrency=``."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_map_batches_never_passes_the_deprecated_concurrency_argument():
    offenders = []
    for folder in ("pipelines", "jobs", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("map_batches", "map", "flat_map")
                        and any(k.arg == "concurrency" for k in node.keywords)):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"use compute=ray.data.ActorPoolStrategy(size=...) instead of concurrency= at {offenders}"
