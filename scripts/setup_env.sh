#!/usr/bin/env bash
# Create (or reuse) .venv at the repository root with the pinned reference environment.
# Idempotent: a stamp file holding the hash of the inputs skips the install when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
stamp=".venv/.wadi-installed"
want="$(cat pyproject.toml constraints.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip wheel setuptools
# torch first and pinned, in its own command: a resolver that sees an unpinned torch first
# would pick a multi-GB CUDA build from the index.
.venv/bin/python -m pip install -q -c constraints.txt torch torchvision
.venv/bin/python -m pip install -q -c constraints.txt -e ".[pipeline,eval,dev,system-metrics,adam8bit]"
echo "$want" > "$stamp"
