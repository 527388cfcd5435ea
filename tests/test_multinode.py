"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``): the distillation trainer with
its two workers on two different nodes (one ``wadi_slot`` resource per node), prompts and
checkpoints on S3 (moto), nothing on a shared local disk but the MLflow sqlite file that stands
in for the tracking server.

One uninterrupted run is the reference; every interrupted run must log the same losses step for
step (deterministic resume), redo no step before the checkpoint it resumed from, and hold the
very same student adapter as the reference at the same step (``adapters/student.safetensors``,
EMA-averaged: every tensor byte and the metadata equal; :func:`_adapter_digest`):
  - a worker killed (``debug.fail_rank``)         -> restart from the last checkpoint
  - a node removed without notice (spot loss)      -> restart on a replacement node
  - a drain notice (``DrainNode``, PREEMPTION, deadline) then the node removed at the deadline
                                                   -> checkpoints at the notice and before the
                                                      deadline; restart loses no step before it
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import SLOT, s3_caption_lake, slot_cluster, slot_node_args

pytestmark = [pytest.mark.slow, pytest.mark.ray]

N_PROMPTS, SHARD = 800, 50  # 25 steps of 32 prompts
STEPS, EVERY = 24, 4
# The drain test: the reclaim comes at the notice's deadline; training is held before PAUSE_AT
# (debug.pause_at_step) until the reclaim, so a fast machine cannot finish the run first, and the
# deadline leaves a slow one 10x the time the notice checkpoint took here (1.5-1.8 s).
DRAIN_DEADLINE_S, PAUSE_AT = 20.0, 3 * EVERY


@pytest.fixture(scope="module")
def cluster(s3_server):  # noqa: ANN001
    pytest.importorskip("ray")
    # Ray Train's drain watcher polls the GCS every 5 s by default; faster here (read by the
    # controller, which inherits this process' environment through the raylets started below).
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"
    with slot_cluster(2) as c:
        yield c
    os.environ.pop("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", None)


@pytest.fixture(scope="module")
def lake(cluster, s3_server, tmp_path_factory):  # noqa: ANN001
    colours, shapes = ("red", "green", "blue", "yellow", "purple", "orange"), ("circle", "square", "triangle")
    where = ("on the left", "on the right", "at the top", "at the bottom")
    captions = [f"a {colours[i % 6]} {shapes[i % 3]} {where[i % 4]}" for i in range(N_PROMPTS)]
    s3_caption_lake(s3_server, "multinode", captions, tmp_path_factory.mktemp("lake"), SHARD)
    return "multinode"


def _cfg(bucket: str, tmp: Path, run: str, steps: int = STEPS, **extra):  # noqa: ANN003
    from pipelines.config.job import load_config

    return load_config("embedded", {
        "data.prompts": f"s3://{bucket}/lake", "data.max_steps": steps,
        "train.run_name": run, "train.storage_path": f"s3://{bucket}/ray", "train.checkpoint_every": EVERY,
        "train.max_failures": 2, "train.keep": 3,
        "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "tracking.experiment": "multinode",
        "tracking.registered_model": "wadi-multinode", "tracking.sample_every": 0, "tracking.num_sample_prompts": 2,
        "evaluation.num_prompts": 0, **extra})


def _fit(bucket: str, tmp: Path, run: str, **kw):  # noqa: ANN003
    from pipelines.run import run_distillation

    return run_distillation(_cfg(bucket, tmp, run, **kw), worker_resources={SLOT: 1})


def _losses(result) -> dict[int, list[tuple[float, float]]]:  # noqa: ANN001
    """Every (loss_gen, loss_fake) logged per step, in logging order (a redone step twice)."""
    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    out: dict[int, list] = defaultdict(list)
    gen = sorted(client.get_metric_history(result.mlflow_run_id, "distill/loss_gen"), key=lambda m: m.timestamp)
    fake = sorted(client.get_metric_history(result.mlflow_run_id, "distill/loss_fake"), key=lambda m: m.timestamp)
    for g, f in zip(gen, fake):
        assert g.step == f.step
        out[g.step].append((g.value, f.value))
    return dict(out)


def _complete(bucket: str) -> dict[str, list[int]]:
    import boto3

    out: dict[str, list[int]] = defaultdict(list)
    for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="ray/"):
        for obj in page.get("Contents", []):
            parts = obj["Key"].split("/")
            if parts[-1] == "COMPLETE" and parts[2].startswith("checkpoint_"):
                out[parts[1]].append(int(parts[2].split("_")[1]))
    return {k: sorted(v) for k, v in out.items()}


def _wait_for_checkpoint(bucket: str, run: str, step: int, fit: threading.Thread | None = None,
                         box: dict | None = None, timeout: float = 240) -> None:
    """Until checkpoint ``step`` of ``run`` is COMPLETE; raises the fit's error if it ended first."""
    deadline = time.time() + timeout
    while step not in _complete(bucket).get(run, []):
        if fit is not None and not fit.is_alive():
            _join(fit, box or {}, 0)
            raise AssertionError(f"{run} ended before checkpoint {step} was COMPLETE")
        if time.time() > deadline:
            raise TimeoutError(f"checkpoint {step} of {run} never became COMPLETE")
        time.sleep(0.2)


def _wait_until_group_gone(fit: threading.Thread, box: dict, timeout: float = 240) -> None:
    """After a worker's node is gone: until the old worker group is torn down, i.e. its placement
    group removed (the raylet kills the workers of a removed bundle), which frees the ``wadi_slot``
    of the surviving node. No rank is left then to write a COMPLETE, and none of a new group can
    start before the replacement joins (its placement group needs two slots): the set of COMPLETE
    checkpoints is final, whatever upload was in flight at the loss."""
    import ray

    deadline = time.time() + timeout
    while ray.available_resources().get(SLOT, 0) < 1:
        if not fit.is_alive():
            _join(fit, box, 0)
            raise AssertionError(f"{fit.name} ended while its node was gone")
        if time.time() > deadline:
            raise TimeoutError("the worker group was not torn down after its node went")
        time.sleep(0.2)


def _adapter_digest(data: bytes) -> str:
    """SHA-256 of a safetensors file's content: its metadata and every tensor's name, dtype, shape
    and raw bytes. Not of the file itself: safetensors writes ``__metadata__`` in hash-map order,
    which differs from process to process, so two equal adapters saved by two processes differ."""
    import hashlib
    import json
    import struct

    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    h = hashlib.sha256(json.dumps(header.pop("__metadata__", {}), sort_keys=True).encode())
    for name in sorted(header):
        begin, end = header[name]["data_offsets"]
        h.update(json.dumps([name, header[name]["dtype"], header[name]["shape"]]).encode())
        h.update(body[begin:end])
    return h.hexdigest()


def _adapter(bucket: str, run: str, step: int) -> bytes:
    from wadi_core import storage

    return storage.read_bytes(f"s3://{bucket}/ray/{run}/checkpoint_{step:08d}/adapters/student.safetensors")


def _assert_same_adapter(bucket: str, run: str, step: int) -> None:
    """The student adapter of ``run``'s checkpoint ``step`` is the reference's, bit for bit; else
    the largest difference, for the report."""
    got, want = _adapter(bucket, run, step), _adapter(bucket, "reference", step)
    if _adapter_digest(got) != _adapter_digest(want):
        from safetensors.torch import load

        a, b = load(got), load(want)
        assert sorted(a) == sorted(b), f"{run}: other tensors than the reference's"
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        raise AssertionError(f"{run}: adapter at step {step} differs from the reference's, max abs difference {diff:.3g}")


def test_adapter_digest_is_exact_and_ignores_metadata_order() -> None:
    """The comparison above: blind to the metadata's order in the file, not to one ulp or -0.0."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import save

    code = ("import sys, torch; from safetensors.torch import save; sys.stdout.buffer.write(save("
            "{'a': torch.arange(6.).reshape(2, 3), 'b': torch.zeros(2)}, metadata={k: k * 2 for k in 'abcdefgh'}))")
    files = {subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout for _ in range(3)}
    assert len({_adapter_digest(f) for f in files}) == 1  # (the files themselves differ, mostly)
    meta = {k: k * 2 for k in "abcdefgh"}
    base = {"a": torch.arange(6.).reshape(2, 3), "b": torch.zeros(2)}
    assert _adapter_digest(save(base, metadata=meta)) == _adapter_digest(next(iter(files)))
    one_ulp = {**base, "a": torch.nextafter(base["a"], torch.tensor(10.))}
    minus_zero = {**base, "b": -torch.zeros(2)}
    for other in (one_ulp, minus_zero):
        assert _adapter_digest(save(other, metadata=meta)) != _adapter_digest(save(base, metadata=meta))
    assert _adapter_digest(save(base, metadata={**meta, "a": "x"})) != _adapter_digest(save(base, metadata=meta))


def _wait_for_step(tmp: Path, run: str, step: int, fit: threading.Thread, box: dict, timeout: float = 240) -> None:
    """Until rank 0 has logged the losses of ``step`` to the MLflow run of ``run``."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    deadline = time.time() + timeout
    while True:
        exp = client.get_experiment_by_name("multinode")
        runs = client.search_runs([exp.experiment_id], f"tags.`wadi.run_name` = '{run}'") if exp else []
        if runs and any(m.step >= step for m in client.get_metric_history(runs[0].info.run_id, "distill/loss_gen")):
            return
        if not fit.is_alive():
            _join(fit, box, 0)
            raise AssertionError(f"{run} ended before step {step}")
        if time.time() > deadline:
            raise TimeoutError(f"{run} never logged step {step}")
        time.sleep(0.2)


def _fit_in_background(bucket: str, tmp: Path, run: str, **kw) -> tuple[threading.Thread, dict]:  # noqa: ANN003
    """The fit in a thread; faults are injected from the main thread (``Cluster.add_node`` starts
    a Ray node, which installs signal handlers: it raises in any other thread)."""
    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = _fit(bucket, tmp, run, **kw)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread by _join
            box["error"] = e

    thread = threading.Thread(target=fit, name=f"fit-{run}", daemon=True)
    thread.start()
    return thread, box


def _join(thread: threading.Thread, box: dict, timeout: float = 420):  # noqa: ANN201
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{thread.name} still running after {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


def _worker_node(cluster):  # noqa: ANN001, ANN201
    """A slot node that hosts a train worker: each worker holds the one ``wadi_slot`` of its
    node, so with every slot taken each slot node hosts one."""
    import ray

    assert ray.available_resources().get(SLOT, 0) == 0, "the train workers do not hold both slots"
    return cluster.slot_nodes[-1]


def _assert_resumed_like(reference: dict, got: dict, resumed_from: int, steps: int) -> None:
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, resumed_from + 1):
        assert len(got[s]) == 1, f"step {s} (before the checkpoint at {resumed_from}) was redone"
    for s, values in got.items():
        for v in values:  # the first try of a redone step and its redo alike
            assert v == reference[s][0], f"step {s}: {v!r} != {reference[s][0]!r}"  # exactly


@pytest.fixture(scope="module")
def reference(cluster, lake, tmp_path_factory):  # noqa: ANN001
    t0 = time.time()
    # every checkpoint kept (4, 8, ..., 24): the interrupted runs' adapters are compared with them
    result = _fit(lake, tmp_path_factory.mktemp("ref"), "reference", steps=STEPS, **{"train.keep": STEPS // EVERY + 2})
    losses = _losses(result)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in losses.values())
    print(f"reference fit: {time.time() - t0:.0f} s")
    return losses


def test_killed_worker_resumes_bit_for_bit(cluster, lake, reference, tmp_path: Path) -> None:  # noqa: ANN001
    """Deterministic resume: losses of a run interrupted at step 7 and resumed from 4 equal the
    reference's, and so does its student adapter at step 8 (trained after the restart), bit for bit."""
    marker = tmp_path / "killed"
    result = _fit(lake, tmp_path, "killed", steps=10, **{"debug.fail_rank": 1, "debug.fail_at_step": 7,
                                                          "debug.fail_marker": str(marker)})
    assert marker.exists() and result.metrics["resumed_from_step"] == EVERY
    _assert_resumed_like(reference, _losses(result), EVERY, 10)
    _assert_same_adapter(lake, "killed", 2 * EVERY)


def test_node_loss_resumes_on_a_replacement_node(cluster, lake, reference, tmp_path: Path) -> None:  # noqa: ANN001
    """A worker's node removed two steps after a checkpoint, without notice (a spot loss): the
    group fails, a replacement node joins, the run ends from the last complete checkpoint with no
    step before it redone (only the steps after it) and the reference's losses."""
    t0 = time.time()
    fit, box = _fit_in_background(lake, tmp_path, "node-loss", steps=12)
    _wait_for_checkpoint(lake, "node-loss", EVERY, fit, box)
    _wait_for_step(tmp_path, "node-loss", EVERY + 2, fit, box)  # mid-interval: steps past the checkpoint are lost
    victim = _worker_node(cluster)
    cluster.remove_node(victim, allow_graceful=False)
    cluster.slot_nodes.remove(victim)
    _wait_until_group_gone(fit, box)  # a COMPLETE already past the barrier has landed; none can follow
    complete = _complete(lake).get("node-loss", [])
    cluster.slot_nodes.append(cluster.add_node(**slot_node_args()))  # the replacement (autoscaler)
    result = _join(fit, box)
    resumed = int(result.metrics["resumed_from_step"])
    assert result.metrics["step"] == 12 and resumed == max(complete) and resumed >= EVERY
    got = _losses(result)
    _assert_resumed_like(reference, got, resumed, 12)
    redone = sorted(s for s, v in got.items() if len(v) > 1)
    assert all(s > resumed for s in redone), redone
    assert redone or resumed > EVERY, "no step after the checkpoint was lost: the node went too early"
    _assert_same_adapter(lake, "node-loss", 12)
    print(f"node loss: checkpoints {complete} at the loss, resumed from {resumed}, steps redone {redone}, "
          f"fit {time.time() - t0:.0f} s")


def test_drain_notice_checkpoints_before_the_reclaim(cluster, lake, reference, tmp_path: Path) -> None:  # noqa: ANN001
    """``DrainNode`` (reason PREEMPTION, a deadline) on a worker's node, as autoscaler v2 / KubeRay
    / ``ray drain-node`` send it: Ray Train's watcher tells the workers, the loop checkpoints at
    the notice step; the node goes at the deadline and the run restarts on a replacement from
    that checkpoint (or a later one), losing only the steps after it.

    Events, not timing: training is held before step ``PAUSE_AT`` (``debug.pause_at_step``) until
    the test has reclaimed the node, so the run cannot end before the reclaim; the notice
    checkpoint must be COMPLETE before the deadline (waited for, asserted); the checkpoints that
    count are read once the old group is torn down."""
    import mlflow
    import ray
    from ray.core.generated import autoscaler_pb2

    t0 = time.time()
    release = tmp_path / "release"
    fit, box = _fit_in_background(lake, tmp_path, "preempted", steps=STEPS, **{
        "debug.pause_at_step": PAUSE_AT, "debug.pause_until": str(release)})
    _wait_for_checkpoint(lake, "preempted", EVERY, fit, box)
    victim = _worker_node(cluster)
    gcs = ray._raylet.GcsClient(address=cluster.gcs_address)
    before = max(_complete(lake)["preempted"])
    notice_at = time.time()
    deadline = notice_at + DRAIN_DEADLINE_S
    accepted, why = gcs.drain_node(victim.node_id, autoscaler_pb2.DrainNodeReason.Value(
        "DRAIN_NODE_REASON_PREEMPTION"), "spot reclaim (test)", int(deadline * 1000))
    assert accepted, why
    while max(_complete(lake)["preempted"]) <= before:  # the notice checkpoint (a step past `before`)
        if time.time() > deadline:
            raise AssertionError(f"no checkpoint after the notice was COMPLETE within its {DRAIN_DEADLINE_S} s")
        if not fit.is_alive():
            _join(fit, box, 0)
            raise AssertionError("the run ended before the reclaim")
        time.sleep(0.1)
    saved_after_s = round(time.time() - notice_at, 1)  # notice -> first checkpoint after it COMPLETE
    time.sleep(max(0.0, deadline - time.time()))  # the reclaim, at the deadline; training waits at PAUSE_AT
    cluster.remove_node(victim, allow_graceful=False)
    cluster.slot_nodes.remove(victim)
    _wait_until_group_gone(fit, box)
    complete_at_reclaim = _complete(lake).get("preempted", [])
    cluster.slot_nodes.append(cluster.add_node(**slot_node_args()))  # the autoscaler's replacement
    release.touch()  # the restarted group trains through PAUSE_AT
    result = _join(fit, box)

    client = mlflow.MlflowClient(result.tracking_uri)
    jit = sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "preemption/checkpoint_step"))
    assert jit, "no checkpoint was written on the drain notice"
    assert jit[0] in complete_at_reclaim, f"the notice checkpoint {jit[0]} was not COMPLETE before the reclaim"
    resumed = int(result.metrics["resumed_from_step"])
    assert result.metrics["step"] == STEPS
    assert resumed > 0, "no restart after the reclaim"
    assert resumed == max(complete_at_reclaim) and resumed >= jit[0]
    got = _losses(result)
    _assert_resumed_like(reference, got, resumed, STEPS)
    _assert_same_adapter(lake, "preempted", STEPS)
    redone = sorted(s for s, v in got.items() if len(v) > 1)
    print(f"drain: notice checkpoints at {jit} (first COMPLETE {saved_after_s} s after the notice, deadline "
          f"{DRAIN_DEADLINE_S} s), COMPLETE at the reclaim {complete_at_reclaim}, resumed from {resumed}, steps "
          f"redone {redone}, fit {time.time() - t0:.0f} s")
