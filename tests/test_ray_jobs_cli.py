"""The README's Ray Jobs path, for real: ``ray start --head`` then ``ray job submit``.

Ray >= 2.59 runs a head in token-auth mode as soon as a token exists (``~/.ray/auth_token``, which
any local ``ray.init()`` creates), but ``ray job submit`` only sends the token when
``RAY_AUTH_MODE=token`` is set in its own environment: without it the submit fails with
``AuthenticationError ... RAY_AUTH_MODE is currently 'disabled'``. The head here is our own (its
own temp dir, ports and token file, never ``~/.ray``) and only its processes are stopped.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_pids(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A token-auth Ray head on free ports; yields (dashboard address, env with the token path)."""
    tmp = Path(tempfile.mkdtemp(prefix="wr", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    # Every listening port free, not Ray's defaults: with a README head already on this machine the
    # agent's default port (52365) is taken, the head comes up without a job agent and every
    # submit fails with "No available agent to submit job".
    ports = {name: _free_port() for name in (
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "ray-client-server-port")}
    dash = ports["dashboard-port"]
    cmd = [str(BIN / "ray"), "start", "--head", "--block", *(f"--{k}={v}" for k, v in ports.items()),
           "--dashboard-host", "127.0.0.1", "--temp-dir", str(tmp), "--num-cpus", "1", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401: up, and asking for the token
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"ray head did not come up (exit {proc.poll()}); logs in {tmp}")
                time.sleep(1)
        yield address, {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            for pid in _own_pids(str(tmp)):  # anything of ours that left the process group
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)


def _submit(address: str, env: dict, *extra: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", *extra, "--",
           "python", "jobs/distill.py", "--dry-run"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_readme_ray_jobs_path_needs_token_mode_and_results_land_in_wadi_home(ray_head, tmp_path):
    address, env = ray_head
    # What the README said before: the CLI is in 'disabled' mode and the head refuses it.
    bare = _submit(address, env, timeout=120)
    assert bare.returncode != 0
    assert "RAY_AUTH_MODE" in bare.stdout + bare.stderr or "uthenticat" in bare.stdout + bare.stderr

    # What it says now: RAY_AUTH_MODE=token for the CLI; results under $WADI_HOME.
    home = tmp_path / "wadi_home"
    ok = _submit(address, {**env, "RAY_AUTH_MODE": "token"},
                 "--runtime-env-json", f'{{"env_vars": {{"WADI_HOME": "{home}"}}}}')
    out = ok.stdout + ok.stderr
    assert ok.returncode == 0, out[-3000:]
    assert "succeeded" in out
    assert f"{home}/runs/ray/wadi-embedded" in out  # the plan's checkpoint folder: $WADI_HOME, not the temp copy
