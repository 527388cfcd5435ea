"""One run, driven as a user would: ``python -m jobs.distill`` in subprocesses on a small tmpfs.

A   SIGINT while paused before step 3 (a second job on the run meanwhile is refused: the lease)
    -> stops after step 3 with a checkpoint, MLflow KILLED, exit 130.
C   resumes at 3; the storage fills up after the checkpoint of step 4 -> the checkpoint of step 6
    fails: exit 1, "storage is full" and where; the checkpoint of step 4 stays usable.
D   space freed: resumes from 4 with nothing deleted by hand; SIGTERM before step 7 -> checkpoint
    of step 7, exit 143, no native stack dump.
E   finishes the two epochs (10 steps), registers the export; every bad shard counted once per epoch.
F   the same command again: nothing to train -> exit 0, nothing registered, the alias unmoved.

Every wait is on an event (a COMPLETE checkpoint, a process exit), bounded; the pauses are the
job's own test hook (``debug.pause_at_step`` / ``debug.pause_until``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOOD, CORRUPT, BATCH = 44, 3, 8  # 5 steps per epoch (4 prompts left over), 2 epochs


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    """A 64 MiB tmpfs (root can mount one here and in CI); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:200]})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _wait(what: str, cond, proc: subprocess.Popen | None = None, timeout: float = 300):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_stops_full_storage_and_a_second_job_on_one_run(tmp_path: Path, small_disk: Path) -> None:
    import mlflow

    from wadi_core.models.tiny import save_tiny_pipeline
    from wadi_core.prompts import write_prompt_shards

    teacher = save_tiny_pipeline(tmp_path / "teacher", "sd")
    lake = tmp_path / "lake"
    write_prompt_shards([(f"{i:06d}", f"a red circle number {i}", {}) for i in range(GOOD)], str(lake), shard_size=5)
    for c in range(CORRUPT):
        (lake / f"prompts-zz-broken-{c}.tar").write_bytes(b"\x01" * 4096)
    storage = small_disk / "ray"
    run_dir = storage / "trust"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = [f"teacher={teacher}", f"data.prompts={lake}", "data.epochs=2", "data.max_steps=0",
            "vsd.student.rank=4", "vsd.fake.rank=2", "vsd.student_ema=0", f"train.global_batch={BATCH}",
            "train.num_workers=2", "train.cpus_per_worker=0.5", "train.checkpoint_every=2", "train.keep=3",
            "train.max_failures=0", "train.run_name=trust", f"train.storage_path={storage}",
            f"tracking.uri={tracking}", "tracking.experiment=trust", "tracking.registered_model=wadi-trust",
            "tracking.sample_every=0", "tracking.num_sample_prompts=2", "evaluation.num_prompts=0"]
    env = {**os.environ, "WADI_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}

    def start(name: str, *extra: str) -> subprocess.Popen:
        out = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen([sys.executable, "-m", "jobs.distill", *base, *extra], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)

    def log(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()

    def complete(step: int) -> bool:
        return (run_dir / f"checkpoint_{step:08d}" / "COMPLETE").exists()

    def finish(proc: subprocess.Popen, name: str, timeout: float = 300) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"{name} did not exit: {log(name)[-3000:]}") from None

    # A: paused before step 3; a second job on the same run is refused while A holds it.
    held_a = tmp_path / "never-a"  # never created: A waits before step 3 until stopped
    a = start("A", "debug.pause_at_step=3", f"debug.pause_until={held_a}")
    _wait("checkpoint 2 of A", lambda: complete(2), a)
    b = subprocess.run([sys.executable, "-m", "jobs.distill", *base], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert b.returncode == 2, b.stderr[-2000:]
    assert f"is held by another job (host {os.uname().nodename}, pid {a.pid}" in b.stderr
    # signalled while held before step 3 (not in the gap between checkpoint 2 and its stop check)
    _wait("A held before step 3", lambda: Path(f"{held_a}.waiting").exists(), a)
    t0 = time.monotonic()
    a.send_signal(signal.SIGINT)
    assert finish(a, "A", 120) == 130, log("A")[-3000:]
    stop_s = time.monotonic() - t0
    assert complete(3), "the stop must checkpoint the step it stopped after"
    assert "SIGINT: stopped after step 3" in log("A")
    client = mlflow.MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("trust").experiment_id])
    assert run.info.status == "KILLED"
    assert not (run_dir / "LEASE.json").exists(), "a stopped job releases its lease"

    # C: the storage fills up once the checkpoint of step 4 is complete.
    release = tmp_path / f"go-{uuid.uuid4().hex[:6]}"
    c = start("C", "debug.pause_at_step=5", f"debug.pause_until={release}")
    _wait("checkpoint 4 of C", lambda: complete(4), c)
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    release.touch()
    assert finish(c, "C") == 1, log("C")[-3000:]
    said = [line.split("failed: ", 1)[1] for line in log("C").splitlines() if "failed: distillation run" in line]
    assert len(said) == 1 and f"storage is full under train.storage_path={storage}" in said[0], log("C")[-3000:]
    assert f"newest complete checkpoint is {run_dir}/checkpoint_{4:08d}" in said[0]

    # D: space again; resumes from 4 (nothing deleted by hand); SIGTERM before step 7.
    filler.unlink()
    held_d = tmp_path / "never-d"
    d = start("D", "debug.pause_at_step=7", f"debug.pause_until={held_d}")
    _wait("checkpoint 6 of D", lambda: complete(6), d)
    _wait("D held before step 7", lambda: Path(f"{held_d}.waiting").exists(), d)
    d.send_signal(signal.SIGTERM)
    assert finish(d, "D", 120) == 143, log("D")[-3000:]
    assert complete(7)
    for dump in ("Fatal Python error", "Stack (most recent call first)", "*** SIGTERM received"):
        assert dump not in log("D"), log("D")[-3000:]

    # E: the rest of the two epochs; registered once. What a person sees: a few lines for a person,
    # and the full log (Ray's output included) in runs/logs/.
    e = start("E")
    assert finish(e, "E") == 0, log("E")[-3000:]
    lines = log("E").splitlines()
    assert len(lines) <= 40, log("E")
    for noise in ("pid=", "INFO", "Reporting training result", "FutureWarning", "\x1b["):
        assert not [line for line in lines if noise in line], (noise, log("E"))
    for said in ("[wadi] data:", "[wadi] training:", "[wadi] step 10/10 | loss_gen", "[wadi] export:",
                 "| data wait ", "data wait         ",
                 "registered model  models:/wadi-trust@candidate", "run page          http://127.0.0.1:5000/#/"):
        assert said in log("E"), (said, log("E"))
    full = Path(next(line for line in lines if line.startswith("[wadi] full log: ")).split(": ", 1)[1].split(" (")[0])
    assert "Reporting training result" in full.read_text() and full.parent == tmp_path / "runs" / "logs"
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["data/bad_corrupt_shard"] == CORRUPT * 2
    assert run.data.metrics["data/unbatched_prompts"] == (GOOD % BATCH) * 2
    assert not {k for k in run.data.metrics if k.startswith("data/bad_")} - {"data/bad_corrupt_shard"}, \
        "counters that stayed 0 are not charted"
    steps = Counter(m.step for m in client.get_metric_history(run.info.run_id, "distill/loss_fake"))
    # 1-3 (SIGINT), 7-10 (SIGTERM) once each; 5-6 twice: C trained them before its checkpoint failed.
    assert steps == Counter({1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2, 7: 1, 8: 1, 9: 1, 10: 1}), steps
    versions = client.search_model_versions("name='wadi-trust'")
    assert len(versions) == 1

    # F: nothing left to train -> no new version, the alias stays.
    f = start("F")
    assert finish(f, "F") == 0, log("F")[-3000:]
    assert "already complete at step 10" in log("F")
    assert len(client.search_model_versions("name='wadi-trust'")) == 1
    assert client.get_model_version_by_alias("wadi-trust", "candidate").version == versions[0].version
    print(json.dumps({"sigint_stop_s": round(stop_s, 1)}))
    shutil.rmtree(run_dir, ignore_errors=True)
