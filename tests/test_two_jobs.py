"""Two jobs at once on one machine, each with its private local Ray (issue #28 item 7).

Ray Train's placement-group cleaner, a detached actor of the run's cluster, asks the State API
every second whether the run's controller still lives and removes the run's placement group when
the answer is "no such actor". Unpinned, its lookup resolves "the" Ray of this host (every GCS
process plus ``ray_current_cluster``) and then the dashboard URL that cluster advertises; with
another Ray on the machine the answer can come from that other Ray and the live run loses its
workers ("Destroying worker since its placement group was removed"). ``pipelines.runtime.cluster.init_ray``
pins each private Ray's own processes to their own cluster.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]

# One private Ray (via init_ray) with a detached actor doing the cleaner's lookup, as the cleaner
# does it, on its own (live) actor id: once alone, once after the other Ray of the test is up.
PROBE = r"""
import json, os, sys, time
from pathlib import Path
import ray
from pipelines.runtime.cluster import init_ray

name, dashboard, sync = sys.argv[1], sys.argv[2] == "1", Path(sys.argv[3])
other = "a" if name == "b" else "b"
init_ray(num_cpus=1, log_to_driver=False, **({} if dashboard else {"include_dashboard": False}))
driver_env = os.environ.get("RAY_ADDRESS")

@ray.remote(num_cpus=0)
class Cleaner:
    def look(self, actor_id):
        from ray._private.services import canonicalize_bootstrap_address_or_die
        from ray.train.v2._internal.state.util import is_actor_alive
        from ray.util.state.exception import RayStateApiException
        out = {"env": os.environ.get("RAY_ADDRESS")}
        try:
            out["gcs"] = canonicalize_bootstrap_address_or_die(None)
        except Exception as e:
            out["gcs"] = f"{type(e).__name__}: {e}"
        try:
            out["alive"] = bool(is_actor_alive(actor_id=actor_id, timeout=10))
        except RayStateApiException:
            out["alive"] = "unavailable"  # the cleaner keeps monitoring
        except Exception as e:  # the cleaner's monitor thread would die of it
            out["alive"] = f"{type(e).__name__}: {e}"
        return out

cleaner = Cleaner.options(lifetime="detached").remote()
me = cleaner._actor_id.hex()
looks = [ray.get(cleaner.look.remote(me))]
(sync / f"{name}-up").write_text("")
deadline = time.time() + 120
while not (sync / f"{other}-up").exists() and time.time() < deadline:
    time.sleep(0.2)
looks.append(ray.get(cleaner.look.remote(me)))
(sync / f"{name}-done").write_text("")
while not (sync / f"{other}-done").exists() and time.time() < deadline:
    time.sleep(0.2)
print("PROBE " + json.dumps({"own": ray.get_runtime_context().gcs_address, "driver_env": driver_env,
                              "looks": looks}))
ray.kill(cleaner)
ray.shutdown()
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def test_cleaner_lookup_resolves_its_own_cluster(tmp_path: Path) -> None:
    """Ray b (dashboard off, like the tests' clusters) looks before and after Ray a (dashboard on,
    like a job) starts. Unpinned, b's lookup is answered by a's dashboard on 127.0.0.1:8265
    (False: b would remove its live placement group) and a's finds two GCS ("Found multiple
    active Ray instances"). Pinned, each resolves its own GCS; a live actor is never reported dead."""
    def start(name: str, dashboard: bool) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", PROBE, name, "1" if dashboard else "0", str(tmp_path)],
                                cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    b = start("b", dashboard=False)
    deadline = time.time() + 120
    while not (tmp_path / "b-up").exists() and b.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    a = start("a", dashboard=True)
    out = {}
    for name, proc in (("a", a), ("b", b)):
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, text[-3000:]
        out[name] = json.loads(next(line for line in text.splitlines() if line.startswith("PROBE "))[6:])
    wrong = [(name, look) for name, res in out.items() for look in res["looks"]
             if look["gcs"] != res["own"] or look["alive"] not in (True, "unavailable")]  # False removes the PG
    assert not wrong, json.dumps(out, indent=1)
    assert all(look["alive"] is True for look in out["a"]["looks"]), out["a"]  # its own dashboard answers
    assert out["a"]["driver_env"] is out["b"]["driver_env"] is None, "init_ray left RAY_ADDRESS in the driver"


# --- two distillation jobs side by side ------------------------------------------------------------

N_PROMPTS, STEPS, EVERY = 96, 6, 3
CLEANER_TROUBLE = ("placement group was removed", "Found multiple active Ray instances",
                   "Exception in thread PlacementGroupCleanerMonitor", "register placement group with cleaner")


def _lake(root: Path) -> Path:
    from wadi_core.prompts import write_prompt_shards

    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
    samples = [(f"{i:09d}", f"a {colours[i % 4]} {shapes[i % 3]} on the left", {}) for i in range(N_PROMPTS)]
    write_prompt_shards(samples, str(root / "lake"), shard_size=24)
    return root / "lake"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_distillation_jobs_side_by_side(tmp_path: Path) -> None:
    """Two ``python jobs/distill.py`` started at once, each with its own WADI_HOME, storage and
    MLflow database and its private local Ray; both exit 0 having trained every step, and neither
    run's cleaner looked at the other cluster or died of the ambiguity.

    Job b's Ray temp dir names job a's cluster as the latest ``ray start`` cluster
    (``ray_current_cluster``, what a ``ray start --head`` on the machine writes), so b's unpinned
    cleaner asks a ("Found multiple active Ray instances ... Connecting to latest cluster"), and a's
    fails ("Found multiple active Ray instances ... Please specify"). Whether the wrong answer then
    removes b's placement group depends on timing (only once the group is registered; the cleaner
    exits on its first "dead"), so the test checks the lookups, not only the outcome."""
    from wadi_core.models.tiny import save_tiny_pipeline

    teacher = save_tiny_pipeline(tmp_path / "teacher", "sd")
    lake = _lake(tmp_path)
    gcs_a = _free_port()
    ray_tmp_b = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live here
    (ray_tmp_b / "ray").mkdir()
    (ray_tmp_b / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{gcs_a}")
    procs = {}
    try:
        for name, extra in (("a", {"RAY_GCS_SERVER_PORT": str(gcs_a)}), ("b", {"RAY_TMPDIR": str(ray_tmp_b)})):
            home = tmp_path / name
            home.mkdir()
            args = [f"teacher={teacher}", f"data.prompts={lake}", "vsd.student.rank=4", "vsd.fake.rank=2",
                    "data.epochs=1", f"data.max_steps={STEPS}", f"train.run_name=two-{name}",
                    "train.global_batch=8", "train.num_workers=2", "train.cpus_per_worker=0.5",
                    f"train.checkpoint_every={EVERY}", "train.keep=1",
                    f"tracking.uri=sqlite:///{home / 'mlflow.db'}", f"tracking.experiment=two-{name}",
                    f"tracking.registered_model=two-{name}", "tracking.sample_every=100",
                    "evaluation.num_prompts=0"]
            log = open(home / "job.log", "w")  # noqa: SIM115
            procs[name] = (subprocess.Popen([sys.executable, str(REPO / "jobs" / "distill.py"), "--json", *args],
                                            cwd=home, env=_env(WADI_HOME=str(home), **extra), stdout=subprocess.PIPE,
                                            stderr=log, text=True), log, home)
        results = {}
        for name, (proc, log, home) in procs.items():
            out, _ = proc.communicate(timeout=900)
            log.close()
            # The console shows only what is for a person; the job's full log has Ray's output.
            (full,) = (home / "runs" / "logs").glob(f"two-{name}-*.log")
            text = (home / "job.log").read_text() + full.read_text()
            assert "Started a local Ray instance" in text or "ray.init" in text or "TrainController" in text
            assert proc.returncode == 0, f"job {name} exited {proc.returncode}:\n{text[-4000:]}"
            # The cleaner of each run watched its own cluster: it neither found another one nor died.
            wrong = [line for line in text.splitlines() if any(s in line for s in CLEANER_TROUBLE)]
            assert not wrong, f"job {name}:\n" + "\n".join(wrong[:20])
            results[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc, log, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
        import shutil

        shutil.rmtree(ray_tmp_b, ignore_errors=True)

    import mlflow

    for name, res in results.items():
        home = tmp_path / name
        assert res["run_name"] == f"two-{name}"
        assert Path(res["checkpoint"]).name == f"checkpoint_{STEPS:08d}", res
        assert Path(res["checkpoint"]).is_relative_to(home), res  # its own storage, under its WADI_HOME
        client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        steps = sorted(m.step for m in client.get_metric_history(res["mlflow_run_id"], "distill/loss_fake"))
        assert steps == list(range(1, STEPS + 1)), (name, steps)  # every step trained, once
