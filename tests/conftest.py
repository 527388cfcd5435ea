"""Shared fixtures: a moto S3 server over real HTTP on 127.0.0.1, a tiny SD pipeline."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """Each test leaves MLflow's process-wide tracking URI and the ``MLFLOW_*`` environment as it
    found them: ``mlflow.set_tracking_uri`` (tests, and ``pipelines.tracking.client.start_run``) also sets
    ``MLFLOW_TRACKING_URI``, which ``default_tracking_uri`` and Ray workers would then inherit."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    before = _mlflow_tracking_utils()._tracking_uri if "mlflow" in sys.modules else None
    yield
    if "mlflow" in sys.modules:
        utils = _mlflow_tracking_utils()
        if utils._tracking_uri != before:
            utils.set_tracking_uri(before)
    for k in [k for k in os.environ if k.startswith("MLFLOW_") and k not in env]:
        del os.environ[k]
    os.environ.update(env)


def _mlflow_tracking_utils():
    """MLflow's module that holds the URI ``mlflow.set_tracking_uri`` set (private: a plain import,
    so an MLflow that moves it fails here loudly instead of leaking URIs between tests)."""
    from mlflow.tracking._tracking_service import utils

    assert hasattr(utils, "_tracking_uri"), "mlflow moved its tracking URI global: update tests/conftest.py"
    return utils


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; sets the AWS_* environment for this process (and children)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket name on the moto server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    # fsspec caches filesystem instances (and their listings): start clean per bucket.
    import fsspec

    fsspec.filesystem("s3").invalidate_cache()
    return name


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A 2-CPU local Ray per test module, started after the moto env is set (workers inherit AWS_*).

    Never the cluster of Ray's current-cluster file (another ``ray start --head`` on this machine):
    ``pipelines.runtime.cluster.init_ray`` starts a private one unless RAY_ADDRESS is set.
    """
    ray = pytest.importorskip("ray")
    from pipelines.runtime.cluster import init_ray

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def reset_process_group() -> None:
    """Destroy the default torch.distributed group and DeepSpeed's cached handle on it, so a later
    test's ``init_process_group`` + ``pipelines.train.engines.init_distributed`` starts clean."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    try:
        import deepspeed.comm.comm as ds_comm
        import deepspeed.utils.groups as ds_groups
    except ImportError:
        return
    ds_comm.cdb = None
    for name, value in list(vars(ds_groups).items()):  # cached handles on the destroyed world group
        if name.startswith("_") and name.endswith("_GROUP") and not isinstance(value, dict):
            setattr(ds_groups, name, None)


@contextlib.contextmanager
def deepspeed_rank(rank: int, world: int, port: int) -> Iterator[None]:
    """In a spawned process: rank ``rank`` of a gloo world of ``world`` on 127.0.0.1:``port`` (one
    thread, as a Ray Train worker) with ``pipelines.train.engines.init_distributed``; the group is
    destroyed on exit, after every rank is done (rank 0 holds the rendezvous store: tearing the group down
    while the others still talk to it once aborted rank 0 with "terminate called without an active exception")."""
    import torch
    import torch.distributed as dist

    from pipelines.train.engines import init_distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    init_distributed()
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def deepspeed_world_of_one() -> Iterator[None]:
    """torch.distributed (gloo, world 1) + ``pipelines.train.engines.init_distributed``; undone on exit."""
    import torch.distributed as dist

    from pipelines.train.engines import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        init_distributed()
        yield
    finally:
        reset_process_group()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deepspeed_engines(distiller, global_batch: int, zero_stage: int = 2, vsd=None) -> dict:
    """The trainer's two DeepSpeed engines over ``distiller``'s adapters (student lr 1e-3, fake lr 1e-2),
    one worker; ``vsd`` replaces the distiller's VSD config (e.g. another mixed precision)."""
    from pipelines.config.job import TrainConfig
    from pipelines.train.engines import build_engine

    train = TrainConfig(global_batch=global_batch, num_workers=1, zero_stage=zero_stage)
    vsd = vsd or distiller.cfg
    return {r: build_engine(distiller.modules(r), lr, train, vsd) for r, lr in (("student", 1e-3), ("fake", 1e-2))}


def actor_rows(teacher_dir: Path, prompts: list[str], dtype: str = "float32", bad: int | None = None) -> dict:
    """``TextEncoderActor``'s rows for ``prompts`` as Ray Data hands it a batch; row ``bad`` (if given)
    arrives marked as an empty caption, so the actor must leave it unencoded."""
    import numpy as np

    from wadi_core.prompts.shards import bad_code
    from pipelines.data.text_encoding import TextEncoderActor

    codes = np.zeros(len(prompts), dtype=np.uint8)
    if bad is not None:
        codes[bad] = bad_code("empty_caption")
    return TextEncoderActor(str(teacher_dir), dtype)({"caption": np.array(prompts, dtype=object), "bad": codes})


class BlockShard:
    """A stand-in for a worker's Ray Data shard (``iter_batches``): blocks of rows ``caption`` and ``bad``,
    an empty caption marked bad as ``empty_caption``, as the lake reader marks it."""

    def __init__(self, blocks: list[list[str]]):
        self.blocks = blocks

    def iter_batches(self, batch_size=None, batch_format="numpy"):  # noqa: ANN001, ANN201
        import numpy as np

        from wadi_core.prompts.shards import bad_code

        empty = bad_code("empty_caption")
        for block in self.blocks:
            yield {"caption": np.array(block, dtype=object),
                   "bad": np.array([empty if c == "" else 0 for c in block], dtype=np.uint8)}


#: The custom resource of tests/test_multinode.py and test_elastic_multinode.py: one per worker node, so each
#: train worker lands on its own node.
SLOT = "wadi_slot"


def slot_node_args() -> dict:
    """``Cluster.add_node`` arguments of a worker node: one CPU and one ``SLOT``."""
    return {"num_cpus": 1, "resources": {SLOT: 1}, "object_store_memory": 100 * 2**20}


@contextlib.contextmanager
def slot_cluster(slots: int) -> Iterator:
    """A ``ray.cluster_utils.Cluster`` on this machine: a 1-CPU head and ``slots`` worker nodes (``c.slot_nodes``),
    this process connected to it; torn down after."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "object_store_memory": 150 * 2**20})
    c.slot_nodes = [c.add_node(**slot_node_args()) for _ in range(slots)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def s3_caption_lake(s3_server: str, bucket: str, captions: list[str], local: Path, shard_size: int) -> str:
    """``captions`` as a WebDataset prompt lake at ``s3://bucket/lake`` (the bucket created on the moto server)."""
    import boto3

    from wadi_core import storage
    from wadi_core.prompts import write_prompt_shards

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    write_prompt_shards([(f"{i:09d}", c, {}) for i, c in enumerate(captions)], str(local), shard_size=shard_size)
    storage.upload_dir(local, f"s3://{bucket}/lake")
    return f"s3://{bucket}/lake"
