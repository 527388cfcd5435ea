"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``): the distillation trainer with
its two workers on two different nodes (one ``wadi_slot`` resource per node), prompts and
checkpoints on S3 (moto), nothing on a shared local disk but the MLflow sqlite file that stands
in for the tracking server.

One uninterrupted run is the reference; every interrupted run must log the same losses step for
step (deterministic resume), and redo no step before the checkpoint it resumed from:
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

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SLOT = "wadi_slot"  # one per worker node: forces the two workers onto two nodes
N_PROMPTS, SHARD = 800, 50  # 25 steps of 32 prompts
STEPS, EVERY = 16, 4


def _node_args() -> dict:
    return {"num_cpus": 1, "resources": {SLOT: 1}, "object_store_memory": 100 * 2**20}


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):  # noqa: ANN001
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Ray Train's drain watcher polls the GCS every 5 s by default; faster here (read by the
    # controller, which inherits this process' environment through the raylets started below).
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "object_store_memory": 150 * 2**20})
    c.slot_nodes = [c.add_node(**_node_args()) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()
    os.environ.pop("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", None)


@pytest.fixture(scope="module")
def lake(cluster, s3_server, tmp_path_factory):  # noqa: ANN001
    import boto3

    from wadi_core import storage
    from wadi_core.prompts import write_prompt_shards

    bucket = "multinode"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    colours, shapes = ("red", "green", "blue", "yellow", "purple", "orange"), ("circle", "square", "triangle")
    where = ("on the left", "on the right", "at the top", "at the bottom")
    samples = [(f"{i:09d}", f"a {colours[i % 6]} {shapes[i % 3]} {where[i % 4]}", {}) for i in range(N_PROMPTS)]
    local = tmp_path_factory.mktemp("lake")
    write_prompt_shards(samples, str(local), shard_size=SHARD)
    storage.upload_dir(local, f"s3://{bucket}/lake")
    return bucket


def _cfg(bucket: str, tmp: Path, run: str, steps: int = STEPS, **extra):  # noqa: ANN003
    from pipelines.config import load_config

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
    gen = sorted(client.get_metric_history(result.mlflow_run_id, "vsd/loss_gen"), key=lambda m: m.timestamp)
    fake = sorted(client.get_metric_history(result.mlflow_run_id, "vsd/loss_fake"), key=lambda m: m.timestamp)
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


def _wait_for_checkpoint(bucket: str, run: str, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while step not in _complete(bucket).get(run, []):
        if time.time() > deadline:
            raise TimeoutError(f"checkpoint {step} of {run} never became COMPLETE")
        time.sleep(0.2)


def _node_of_worker(cluster):  # noqa: ANN001
    """A slot node that hosts a train worker (both do)."""
    return cluster.slot_nodes[-1]


def _assert_resumed_like(reference: dict, got: dict, resumed_from: int, steps: int) -> None:
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, resumed_from + 1):
        assert len(got[s]) == 1, f"step {s} (before the checkpoint at {resumed_from}) was redone"
    for s, values in got.items():
        for v in values:  # the first try of a redone step and its redo alike
            assert v == pytest.approx(reference[s][0], rel=1e-5, abs=1e-6), f"step {s}: {v} != {reference[s][0]}"


@pytest.fixture(scope="module")
def reference(cluster, lake, tmp_path_factory):  # noqa: ANN001
    t0 = time.time()
    result = _fit(lake, tmp_path_factory.mktemp("ref"), "reference", steps=STEPS)
    losses = _losses(result)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in losses.values())
    print(f"reference fit: {time.time() - t0:.0f} s")
    return losses


def test_killed_worker_resumes_bit_for_bit(cluster, lake, reference, tmp_path: Path) -> None:  # noqa: ANN001
    """Issue 18.4: losses of a run interrupted at step 7 and resumed from 4 equal the reference's."""
    marker = tmp_path / "killed"
    result = _fit(lake, tmp_path, "killed", steps=10, **{"debug.fail_rank": 1, "debug.fail_at_step": 7,
                                                          "debug.fail_marker": str(marker)})
    assert marker.exists() and result.metrics["resumed_from_step"] == EVERY
    _assert_resumed_like(reference, _losses(result), EVERY, 10)


@pytest.mark.skip(reason="issue 18 WIP: after remove_node the restarted group timed out waiting for 2 workers "
                         "(worker group startup 60 s) even with a replacement node added; not diagnosed yet")
def test_node_loss_resumes_on_a_replacement_node(cluster, lake, reference, tmp_path: Path) -> None:  # noqa: ANN001
    """Issue 18.2: a node removed mid-run (no notice); the run ends from the last complete
    checkpoint on a replacement node, no step before it redone, same losses as the reference."""
    seen: dict = {}

    def reclaim() -> None:
        _wait_for_checkpoint(lake, "node-loss", EVERY)
        victim = _node_of_worker(cluster)
        cluster.remove_node(victim, allow_graceful=False)
        cluster.slot_nodes.remove(victim)
        seen["removed_at"] = time.time()
        time.sleep(1.0)
        seen["complete"] = _complete(lake).get("node-loss", [])
        cluster.slot_nodes.append(cluster.add_node(**_node_args()))  # the replacement (autoscaler)

    injector = threading.Thread(target=reclaim, daemon=True)
    injector.start()
    t0 = time.time()
    result = _fit(lake, tmp_path, "node-loss", steps=12)
    injector.join(timeout=60)
    assert "removed_at" in seen, "the node was never removed"
    resumed = int(result.metrics["resumed_from_step"])
    assert result.metrics["step"] == 12 and resumed == max(seen["complete"]) and resumed >= EVERY
    got = _losses(result)
    _assert_resumed_like(reference, got, resumed, 12)
    lost = sum(len(v) - 1 for v in got.values())
    print(f"node loss: resumed from {resumed}, {lost} steps redone, fit {time.time() - t0:.0f} s")


@pytest.mark.skip(reason="issue 18 WIP: after remove_node the restarted group timed out waiting for 2 workers "
                         "(worker group startup 60 s) even with a replacement node added; not diagnosed yet")
def test_drain_notice_checkpoints_before_the_reclaim(cluster, lake, reference, tmp_path: Path) -> None:  # noqa: ANN001
    """Issue 18.3: ``DrainNode`` (reason PREEMPTION, 8 s deadline) on a worker's node -> Ray Train's
    watcher tells the workers, the loop checkpoints at once and again before the deadline; the
    node goes at the deadline, the run restarts on a replacement from the last of those."""
    import ray
    from ray.core.generated import autoscaler_pb2

    seen: dict = {}
    deadline_s = 8.0

    def preempt() -> None:
        _wait_for_checkpoint(lake, "preempted", EVERY)
        victim = _node_of_worker(cluster)
        gcs = ray._raylet.GcsClient(address=cluster.gcs_address)
        seen["notice_at"] = time.time()
        accepted, why = gcs.drain_node(victim.node_id, autoscaler_pb2.DrainNodeReason.Value(
            "DRAIN_NODE_REASON_PREEMPTION"), "spot reclaim (test)", int((time.time() + deadline_s) * 1000))
        seen["accepted"] = (accepted, why)
        cluster.slot_nodes.remove(victim)
        cluster.slot_nodes.append(cluster.add_node(**_node_args()))  # the autoscaler's replacement
        time.sleep(max(0.0, seen["notice_at"] + deadline_s - time.time()))
        seen["complete"] = _complete(lake).get("preempted", [])
        cluster.remove_node(victim, allow_graceful=False)  # the reclaim at the deadline

    injector = threading.Thread(target=preempt, daemon=True)
    injector.start()
    t0 = time.time()
    result = _fit(lake, tmp_path, "preempted", steps=STEPS)
    injector.join(timeout=60)
    assert seen.get("accepted", (False,))[0], seen
    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    jit = sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "preemption/checkpoint_step"))
    assert jit, "no checkpoint was written on the drain notice"
    resumed = int(result.metrics["resumed_from_step"])
    got = _losses(result)
    lost = sum(len(v) - 1 for v in got.values())
    assert result.metrics["step"] == STEPS
    if resumed:  # the run outlived the deadline: restarted from the last checkpoint before it
        assert resumed == max(seen["complete"]) and resumed >= jit[0]
    _assert_resumed_like(reference, got, resumed, STEPS)
    print(f"drain: notice checkpoints at {jit}, resumed from {resumed}, {lost} steps redone, "
          f"fit {time.time() - t0:.0f} s")
