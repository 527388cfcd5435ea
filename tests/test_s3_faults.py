"""Object-store faults: a fault-injecting proxy (tests/s3_fault_proxy.py) in front of moto is THE
S3 endpoint of the driver and of every Ray worker. One distillation fit reads its prompt shards
and writes its checkpoints through it while it answers 503, resets connections and answers
slowly for a bounded number of requests; one shard fails on every read.

Must hold: transient faults are retried (the run finishes), the always-failing shard is skipped
and counted (``data/bad_unreadable_shard``), and every checkpoint marked COMPLETE has every file
of its manifest in storage, intact.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from s3_fault_proxy import Fault, FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.ray]

N_PROMPTS, SHARD, STEPS, EVERY = 480, 40, 6, 2


def test_pyarrow_and_s3fs_retry_through_the_proxy(s3_server, s3_bucket: str) -> None:
    """Fast, no Ray: both S3 clients survive 503 / reset / slow answers on reads and writes."""
    from pipelines.data.prompts import pyarrow_filesystem, read_shard_batch
    from wadi_core import storage

    os.environ["AWS_ENDPOINT_URL"] = s3_server
    faults = [Fault("PUT", r"/a\.bin$", "503", 2), Fault("PUT", r"/b\.bin$", "reset", 1),
              Fault("GET", r"/a\.bin$", "reset", 1), Fault("GET", r"/b\.bin$", "503", 2),
              Fault("GET", r"/b\.bin$", "slow", 1, delay_s=1.0), Fault("GET", r"/bad\.tar$", "503", None)]
    with FaultProxy(s3_server, faults) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        try:
            import pyarrow as pa

            fs, root = pyarrow_filesystem(f"s3://{s3_bucket}/x")
            with fs.open_output_stream(f"{root}/a.bin") as f:
                f.write(b"a" * 1000)
            storage.write_bytes(f"s3://{s3_bucket}/x/b.bin", b"b" * 1000)  # s3fs (botocore)
            with fs.open_input_stream(f"{root}/b.bin") as f:
                assert f.read() == b"b" * 1000
            assert storage.read_bytes(f"s3://{s3_bucket}/x/a.bin") == b"a" * 1000
            storage.write_bytes(f"s3://{s3_bucket}/x/bad.tar", b"x")  # PUT passes, every GET fails
            out = read_shard_batch(pa.table({"path": [f"{root}/bad.tar"]}), uri=f"s3://{s3_bucket}/x")
            assert out.column("bad").to_pylist() == [1 + 5]  # one unreadable_shard row
        finally:
            os.environ["AWS_ENDPOINT_URL"] = s3_server
        counts = {f"{f.method} {f.path} {f.kind}": f.injected for f in faults}
    assert all(n >= 1 for n in counts.values()), counts


@pytest.fixture(scope="module")
def proxied_ray(s3_server):  # noqa: ANN001
    """A local 2-CPU Ray whose workers see the proxy as AWS_ENDPOINT_URL.

    pyarrow's S3 requests get 3 attempts instead of 8 (``WADI_S3_MAX_ATTEMPTS``): the SDK waits up
    to 20 s between attempts, so 3 reads of the shard that never reads took ~130 s of this test;
    every bounded fault below still needs the retries (at most 2 per request)."""
    ray = pytest.importorskip("ray")
    from pipelines.runtime.cluster import init_ray

    with FaultProxy(s3_server) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
        os.environ["WADI_S3_MAX_ATTEMPTS"] = "3"
        init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield proxy
        finally:
            ray.shutdown()
            os.environ["AWS_ENDPOINT_URL"] = s3_server
            os.environ.pop("WADI_S3_MAX_ATTEMPTS", None)


def test_distillation_survives_object_store_faults(proxied_ray, s3_server, tmp_path: Path) -> None:  # noqa: ANN001
    import boto3
    import pyarrow.fs as pafs

    from pipelines.train.checkpoint import complete_checkpoints, verify_checkpoint
    from pipelines.config.job import load_config
    from pipelines.run import run_distillation
    from wadi_core import storage
    from wadi_core.prompts import write_prompt_shards

    proxy = proxied_ray
    bucket = "faults"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    samples = [(f"{i:09d}", f"a {('red', 'blue', 'green')[i % 3]} circle on the left", {}) for i in range(N_PROMPTS)]
    write_prompt_shards(samples, str(tmp_path / "lake"), shard_size=SHARD)
    shards = sorted(p.name for p in (tmp_path / "lake").glob("*.tar"))
    storage.upload_dir(tmp_path / "lake", f"s3://{bucket}/lake")
    # Bounded faults (per distinct object where it says so), then one shard that never reads.
    proxy.faults[:] = [
        Fault("GET", rf"/lake/{shards[0]}$", "503", 2), Fault("GET", rf"/lake/{shards[1]}$", "reset", 2),
        Fault("GET", rf"/lake/{shards[2]}$", "slow", 1, delay_s=3.0),
        Fault("GET", rf"/lake/{shards[3]}$", "503", None),  # keeps failing: skipped and counted
        Fault("PUT", rf"/ray/faults/checkpoint_{EVERY:08d}/", "503", 1, per_path=True),  # each file of the first
        Fault("PUT", r"/ray/faults/checkpoint_\d+/.*zero_pp_rank_\d+_mp_rank_00_optim_states\.pt$", "reset", 2,
              per_path=True),  # every rank's ZeRO shard
        Fault("PUT", r"/ray/faults/checkpoint_\d+/train_state\.json$", "slow", 2, delay_s=2.0),
        Fault("PUT", r"/ray/faults/checkpoint_\d+/COMPLETE$", "503", 2),
    ]
    t0 = time.time()
    result = run_distillation(load_config("embedded", {
        "data.prompts": f"s3://{bucket}/lake", "data.max_steps": STEPS, "train.run_name": "faults",
        "train.storage_path": f"s3://{bucket}/ray", "train.checkpoint_every": EVERY, "train.keep": 10,
        "train.max_failures": 0,  # a fault that was not retried fails the test instead of a restart hiding it
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "faults",
        "tracking.registered_model": "wadi-faults", "tracking.sample_every": 0, "tracking.num_sample_prompts": 2,
        "evaluation.num_prompts": 0}))
    fit_s = time.time() - t0
    assert result.metrics["step"] == STEPS and result.metrics["resumed_from_step"] == 0
    assert result.metrics["data/bad_unreadable_shard"] == 1  # the shard that kept failing, once
    injected = {f"{f.method} {f.path} {f.kind}": f.injected for f in proxy.faults}
    assert all(n >= 1 for n in injected.values()), injected

    # Every COMPLETE checkpoint has all its files, intact (checked against the SHA-256 manifest).
    checkpoints = complete_checkpoints(f"s3://{bucket}/ray", "faults")
    assert [int(c.path.rsplit("_", 1)[1]) for c in checkpoints] == [STEPS, *range(STEPS - EVERY, 0, -EVERY)]
    for c in checkpoints:
        with c.as_directory() as d:
            verify_checkpoint(d)
    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("//")[1], scheme="http")
    assert fs.get_file_info(f"{bucket}/ray/faults/export/model_index.json").type == pafs.FileType.File
    print(f"faults injected {proxy.injected()} ({injected}), fit {fit_s:.0f} s")
