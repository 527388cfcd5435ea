"""What a run says can be trusted (docs/RELIABILITY.md): no zero-step success, every prompt once per
epoch, one job per run, manifests confined to their checkpoint, a full storage that recovers,
clean stops. Fast, no Ray cluster (the Ray ones: tests/test_run_trust_ray.py)."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest

from wadi_core.config import ConfigError

from conftest import BlockShard


# -- every prompt once per epoch (pipelines.data.prompts.PromptStream) ------------------------------------------------


class _World:
    """Collectives for ranks simulated by threads: a barrier per call, like torch.distributed's."""

    def __init__(self, n: int):
        self.n = n
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list = [None] * n

    def _exchange(self, rank: int, value):  # noqa: ANN001
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def stream(self, rank: int, batch: int):  # noqa: ANN201
        from pipelines.data.prompts import PromptStream

        return PromptStream(batch, rank, self.n, all_true=lambda f: all(self._exchange(rank, f)),
                            gather=lambda rows: self._exchange(rank, rows))


def _run_world(splits: list, batch: int, skip: int = 0) -> tuple[list[list], list]:  # noqa: ANN001
    """Each rank's batches (threads in lockstep) and streams."""
    world = _World(len(splits))
    out: list[list] = [[] for _ in splits]
    streams = [world.stream(r, batch) for r in range(len(splits))]
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            out[rank] = list(streams[rank].batches(splits[rank], skip=skip))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            world.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(splits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return out, streams


@pytest.mark.parametrize("sizes,batch", [([10, 3], 2), ([0, 9, 4], 3), ([7], 4), ([5, 5], 5), ([1, 0, 0], 1),
                                         ([25, 0, 13], 4)])
def test_prompt_stream_reads_every_prompt_once_and_cuts_whole_global_batches(sizes, batch) -> None:  # noqa: ANN001
    ids = iter(range(10_000))
    splits = [BlockShard([[f"p{next(ids)}" for _ in range(n)]] if n else []) for n in sizes]
    total = sum(sizes)
    out, streams = _run_world(splits, batch)
    world, global_batch = len(sizes), batch * len(sizes)
    steps = {len(b) for b in out}
    assert len(steps) == 1, "every rank must take the same number of steps"
    trained = [p for rank in out for b in rank for p in b]
    assert all(len(b) == batch for rank in out for b in rank)
    assert len(trained) == len(set(trained)), "a prompt trained twice in one epoch"
    assert len(trained) == (total // global_batch) * global_batch
    assert {s.remainder for s in streams} == {total - len(trained)} and streams[0].remainder < global_batch
    assert len(out[0]) == total // global_batch
    # resume: skipping k global batches replays exactly the rest
    for k in range(len(out[0]) + 1):
        rest, _ = _run_world(splits, batch, skip=k)
        assert rest == [rank[k:] for rank in out]
    del world


def test_prompt_stream_counts_every_bad_row() -> None:
    splits = [BlockShard([["a", "", "b"], [""]]), BlockShard([["", "c"]])]
    _, streams = _run_world(splits, 1)
    assert sum(s.bad["empty_caption"] for s in streams) == 3


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("workers", [2, 3])
def test_ray_split_of_real_lakes_reads_every_prompt_once(tmp_path: Path, workers: int) -> None:
    """The real Ray Data split (pipelines.data.prompts.exact_split) over lakes of 1 to 7 shards, with corrupt
    shards, two epochs: prompt ids counted, bad shards x epochs counted."""
    ray = pytest.importorskip("ray")
    from ray.train import DataConfig

    from wadi_core.prompts import write_prompt_shards

    from pipelines.runtime.cluster import init_ray
    from pipelines.data.prompts import exact_split, prompt_dataset

    started = init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ingest = DataConfig.default_ingest_options()
        ingest.preserve_order = True
        for shards in range(1, 8):
            lake = tmp_path / f"lake{shards}_{workers}"
            n = 5 * shards + shards % 3  # uneven shards and remainders
            write_prompt_shards([(f"{i:06d}", f"prompt {i}", {}) for i in range(n)], str(lake),
                                shard_size=max(1, n // shards))
            corrupt = shards % 3
            for c in range(corrupt):
                (lake / f"zz-broken-{c}.tar").write_bytes(b"not a tar" * 200)
            for epoch in range(2):
                ds = prompt_dataset(str(lake), seed=7, epoch=epoch)
                splits = exact_split(ingest).configure({"p": ds}, workers, None, None)
                out, streams = _run_world([s["p"] for s in splits], 2)
                trained = [p for rank in out for b in rank for p in b]
                assert len(trained) == len(set(trained)), "a prompt trained twice in one epoch"
                assert len(trained) + streams[0].remainder == n, (shards, workers, epoch)
                assert streams[0].remainder < 2 * workers
                assert sum(s.bad["corrupt_shard"] for s in streams) == corrupt, (shards, workers, epoch)
    finally:
        if started:
            ray.shutdown()


# -- no zero-step success (pipelines.run.check_lake) -------------------------------------------------------


def _cfg(lake: Path, **over):  # noqa: ANN001, ANN003, ANN202
    from pipelines.config.job import load_config

    return load_config("embedded", {"data.prompts": str(lake), "train.global_batch": 16, **over})


def _write_lake(path: Path, n: int, corrupt: int = 0, manifest: bool = True) -> Path:
    from wadi_core.prompts import write_prompt_shards

    if n:
        write_prompt_shards([(f"{i:06d}", f"a red circle {i}", {}) for i in range(n)], str(path), shard_size=5)
    path.mkdir(parents=True, exist_ok=True)
    if not manifest:
        (path / "manifest.json").unlink(missing_ok=True)
    for c in range(corrupt):
        (path / f"broken-{c}.tar").write_bytes(b"\xff" * 3000)
    return path


def test_a_lake_smaller_than_one_global_batch_is_refused_with_its_count(tmp_path: Path) -> None:
    from pipelines.run import check_lake

    lake = _write_lake(tmp_path / "small", 8)
    with pytest.raises(ConfigError, match=r"small holds 8 prompts .*one global batch \(train.global_batch=16\)"):
        check_lake(_cfg(lake), str(lake))
    lake = _write_lake(tmp_path / "small-no-manifest", 8, manifest=False)
    with pytest.raises(ConfigError, match=r"has 8 readable prompts in its 2 shard\(s\).*train.global_batch=16"):
        check_lake(_cfg(lake), str(lake))
    num, samples = check_lake(_cfg(lake, **{"train.global_batch": 8, "tracking.num_sample_prompts": 3}), str(lake))
    assert num is None and samples == ["a red circle 0", "a red circle 1", "a red circle 2"]


def test_a_lake_of_corrupt_shards_or_no_shards_is_refused(tmp_path: Path) -> None:
    from pipelines.run import check_lake

    lake = _write_lake(tmp_path / "corrupt", 0, corrupt=3)
    with pytest.raises(ConfigError, match=r"has 0 readable prompts in its 3 shard\(s\)"):
        check_lake(_cfg(lake), str(lake))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"data.prompts=.*empty: no usable .tar prompt shards"):
        check_lake(_cfg(empty), str(empty))
    with pytest.raises(ConfigError, match=r"data.prompts=.*missing: cannot list prompt shards"):
        check_lake(_cfg(tmp_path / "missing"), str(tmp_path / "missing"))


def test_the_job_refuses_a_tiny_lake_with_exit_2_before_ray(tmp_path: Path) -> None:
    import subprocess
    import sys

    lake = _write_lake(tmp_path / "tiny", 8)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.distill", f"data.prompts={lake}", "train.global_batch=16",
                           f"train.storage_path={tmp_path / 'ray'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "WADI_HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds 8 prompts" in proc.stderr and "train.global_batch=16" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ray").exists(), "nothing may be written for a refused run"
    assert time.monotonic() - t0 < 120


# -- small config and caption checks --------------------------------------------------------------------------


def test_nan_and_learning_rate_messages() -> None:
    from pipelines.config.job import load_config

    with pytest.raises(ConfigError, match=r"^train.cpus_per_worker: expected a number, got NaN$"):
        load_config("embedded", {"train.cpus_per_worker": "nan"})
    with pytest.raises(ConfigError, match=r"^vsd.gen_lr must be a positive, finite learning rate"):
        load_config("embedded", {"vsd.gen_lr": -1})


def test_captions_of_only_whitespace_nul_or_zero_width_are_empty(tmp_path: Path) -> None:
    from wadi_core.prompts.shards import parse_prompt_tar, prompt_shard_bytes

    texts = ["\0\0\0", " \t\n", "\u200b\u200b", "\u00a0", "ok", "🙂", "a\0b"]
    parsed = parse_prompt_tar(prompt_shard_bytes([(f"{i:04d}", t, {}) for i, t in enumerate(texts)]))
    assert parsed.captions == ["ok", "🙂", "a\0b"]
    assert parsed.bad["empty_caption"] == 4


# -- manifests confined to their checkpoint -------------------------------------------------------------------


def _checkpoint(root: Path, files: dict[str, bytes]) -> Path:
    from pipelines.train.checkpoint import COMPLETE, file_manifest

    d = root / "run" / "checkpoint_00000004"
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    manifest = file_manifest(d)
    (d / COMPLETE).write_text(json.dumps({"files": manifest}))
    return d


@pytest.mark.parametrize("entry", ["../../../outside.txt", "ABSOLUTE", "a/../../outside.txt", "./x", "a//b", "LINK"])
def test_a_manifest_that_names_a_file_outside_is_tampered_and_nothing_is_read(tmp_path: Path, monkeypatch,
                                                                             entry: str) -> None:  # noqa: ANN001
    import hashlib

    import pipelines.train.checkpoint as ck

    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    d = _checkpoint(tmp_path / "store", {"train_state.json": b"{}"})
    if entry == "ABSOLUTE":
        entry = str(outside)
    if entry == "LINK":
        (d / "link").symlink_to(outside)
        entry = "link"
    body = json.loads((d / ck.COMPLETE).read_text())
    body["files"][entry] = {"sha256": hashlib.sha256(b"secret").hexdigest(), "bytes": 6}
    (d / ck.COMPLETE).write_text(json.dumps(body))
    read: list[Path] = []
    monkeypatch.setattr(ck, "_sha256", lambda p: read.append(Path(p)) or "")
    with pytest.raises(ck.TamperedCheckpoint, match=r"is tampered: its COMPLETE manifest lists .*nothing it names"):
        ck.verify_checkpoint(d)
    assert read == [], "no file may be read once the manifest is found tampered"


def test_an_unlisted_symlink_out_of_a_checkpoint_is_tampered(tmp_path: Path) -> None:
    import pipelines.train.checkpoint as ck

    d = _checkpoint(tmp_path, {"train_state.json": b"{}"})
    (d / "student").mkdir()
    (d / "student" / "mp_rank_00_model_states.pt").symlink_to("/etc/hostname")
    with pytest.raises(ck.TamperedCheckpoint, match="a symlink that leads outside"):
        ck.verify_checkpoint(d)


def test_resume_counts_tampered_checkpoints_apart_and_falls_back(tmp_path: Path) -> None:
    import pipelines.train.checkpoint as ck

    good = _checkpoint(tmp_path / "a", {"x.bin": b"1"})
    bad = _checkpoint(tmp_path / "b", {"x.bin": b"2"})
    body = json.loads((bad / ck.COMPLETE).read_text())
    body["files"]["../../../../etc/passwd"] = {"sha256": "0" * 64, "bytes": 1}
    (bad / ck.COMPLETE).write_text(json.dumps(body))

    class C:
        def __init__(self, p: Path):
            self.path = str(p)

        def as_directory(self):  # noqa: ANN201
            import contextlib

            return contextlib.nullcontext(self.path)

    with pytest.warns(UserWarning, match="is tampered"):
        state, rejected = ck.load_first_good_checkpoint([C(bad), C(good)], lambda d: str(d))
    assert state == str(good) and len(rejected) == 1 and isinstance(rejected[0], ck.TamperedCheckpoint)


# -- one job per run (pipelines.runtime.lease) ------------------------------------------------------------------------


def _lease_roundtrip(storage: str) -> None:
    from pipelines.runtime.lease import LeaseHeld, RunLease

    first = RunLease(storage, "run", heartbeat_s=0.2).acquire()
    try:
        with pytest.raises(LeaseHeld, match=rf"run 'run' is held by another job \(host .*pid {os.getpid()}"):
            RunLease(storage, "run").acquire()
        raw = first._store.read()
        before = json.loads(raw)["heartbeat"]
        deadline = time.monotonic() + 30
        while json.loads(first._store.read())["heartbeat"] == before:  # the heartbeat thread renews it
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
    finally:
        first.release()
    assert first._store.read() is None, "release must delete the lease"
    with RunLease(storage, "run"):  # free again
        pass


def test_the_run_lease_refuses_a_second_job_and_renews_itself_locally(tmp_path: Path) -> None:
    _lease_roundtrip(str(tmp_path / "ray"))


def test_the_run_lease_on_s3_is_atomic(s3_bucket: str) -> None:
    _lease_roundtrip(f"s3://{s3_bucket}/ray")


def test_a_stale_or_dead_lease_is_taken_over(tmp_path: Path) -> None:
    import socket

    from pipelines.runtime.lease import RunLease

    lease = tmp_path / "ray" / "run" / "LEASE.json"
    lease.parent.mkdir(parents=True)
    lease.write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600}))
    with pytest.warns(UserWarning, match="last heartbeat was 36.. s ago"), RunLease(str(tmp_path / "ray"), "run"):
        assert json.loads(lease.read_text())["pid"] == os.getpid()
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease.write_text(json.dumps({"owner": "y", "host": socket.gethostname(), "pid": int(dead.stdout),
                                 "heartbeat": time.time()}))
    with pytest.warns(UserWarning, match="is gone"), RunLease(str(tmp_path / "ray"), "run"):
        pass


def test_an_mlflow_run_of_another_storage_path_is_not_resumed(tmp_path: Path) -> None:
    from pipelines.run import _find_mlflow_run
    from pipelines.tracking.client import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run("exp", run_name="r", tracking_uri=uri, params={"train.storage_path": "/data/a"},
                   tags={"wadi.run_name": "r"}) as t:
        run_id = t.run_id
    assert _find_mlflow_run(uri, "exp", "r", "/data/a") == run_id
    with pytest.raises(ConfigError, match=r"train.storage_path=/data/a, but this job stores it in /data/b"):
        _find_mlflow_run(uri, "exp", "r", "/data/b")


# -- a full storage, Ray's snapshot --------------------------------------------------------------------------


def test_a_full_storage_is_not_retried_and_says_so() -> None:
    from wadi_core.storage import StorageFull, retry_io

    calls = []

    def put() -> None:
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageFull, match="storage is full: upload of /mnt/ckpt/x failed"):
        retry_io(put, "upload of /mnt/ckpt/x")
    assert len(calls) == 1


def test_an_unusable_ray_snapshot_is_moved_aside(tmp_path: Path) -> None:
    from pipelines.train.checkpoint import RAY_SNAPSHOT, repair_ray_snapshot

    run = tmp_path / "run"
    run.mkdir()
    assert repair_ray_snapshot(str(tmp_path), "run") is None  # none there
    (run / RAY_SNAPSHOT).write_bytes(b"")  # what a full disk left
    with pytest.warns(UserWarning, match="is unreadable"):
        assert "unreadable" in repair_ray_snapshot(str(tmp_path), "run")
    assert not (run / RAY_SNAPSHOT).exists() and list(run.glob(f"{RAY_SNAPSHOT}.unusable-*"))
    (run / "checkpoint_00000002").mkdir()
    snap = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000002"}]}
    (run / RAY_SNAPSHOT).write_text(json.dumps(snap))
    assert repair_ray_snapshot(str(tmp_path), "run") is None and (run / RAY_SNAPSHOT).exists()
    snap["checkpoint_results"].append({"checkpoint_dir_name": "checkpoint_00000004"})
    (run / RAY_SNAPSHOT).write_text(json.dumps(snap))
    with pytest.warns(UserWarning, match="names checkpoints that are gone \\(checkpoint_00000004\\)"):
        repair_ray_snapshot(str(tmp_path), "run")


# -- clean stops ----------------------------------------------------------------------------------------------


def test_a_stopped_run_is_killed_in_mlflow_and_exits_128_plus_signal(tmp_path: Path) -> None:
    import signal

    import mlflow

    from pipelines.runtime.stop import RunInterrupted, exit_code
    from pipelines.tracking.client import start_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RunInterrupted, match=r"SIGTERM: stopped after step 7; newest checkpoint /c\. Rerun"):
        with start_run("exp", run_name="r", tracking_uri=uri) as t:
            raise RunInterrupted(signal.SIGTERM, 7, "/c")
    assert mlflow.MlflowClient(uri).get_run(t.run_id).info.status == "KILLED"
    with pytest.raises(RuntimeError, match="boom"), start_run("exp", run_name="r2", tracking_uri=uri) as t2:
        raise RuntimeError("boom")
    assert mlflow.MlflowClient(uri).get_run(t2.run_id).info.status == "FAILED"
    assert exit_code(signal.SIGINT) == 130 and exit_code(signal.SIGTERM) == 143
