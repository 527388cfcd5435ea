"""One download per node: 4 processes materialise the same ``s3://`` teacher folder at once
(as 4 train workers of a node do) through a moto S3 server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Each reader counts the downloads it does itself (wrapping storage._fetch) and slows them down,
# so that without the node lock the 4 readers would all see missing files and fetch them.
READER = r"""
import hashlib, json, sys, time
from pathlib import Path

import pytest
from wadi_core import storage

fetched = []
real_fetch = storage._fetch
def counting_fetch(fs, remote, dest, etag):
    fetched.append(remote)
    time.sleep(0.3)
    return real_fetch(fs, remote, dest, etag)
storage._fetch = counting_fetch
start_at = float(sys.argv[3])
while time.time() < start_at:  # all readers start together
    time.sleep(0.005)
local = storage.materialize(sys.argv[1], cache_dir=sys.argv[2])
files = {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest()
         for p in sorted(local.rglob("*")) if p.is_file()}
print(json.dumps({"fetched": fetched, "path": str(local), "files": files}))
"""


def _readers(uri: str, cache: Path, n: int) -> list[dict]:
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start_at = time.time() + 6.0  # imports (s3fs, botocore) take a few seconds on a busy machine
    procs = [subprocess.Popen([sys.executable, "-c", READER, uri, str(cache), str(start_at)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.slow
def test_four_local_readers_download_each_object_once(s3_bucket: str, tmp_path: Path) -> None:
    from wadi_core import storage

    src = tmp_path / "teacher"
    blobs = {"model_index.json": b'{"_class_name": "X"}', "unet/diffusion_pytorch_model.safetensors": os.urandom(300_000),
             "unet/config.json": b"{}", "text_encoder/model.safetensors": os.urandom(200_000)}
    for key, data in blobs.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    uri = f"s3://{s3_bucket}/models/teacher"
    storage.upload_dir(src, uri)
    want = {k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()}

    cache = tmp_path / "node-cache"
    results = _readers(uri, cache, 4)
    fetched = [r for res in results for r in res["fetched"]]
    assert sorted(fetched) == sorted(f"{s3_bucket}/models/teacher/{k}" for k in blobs), fetched  # once each
    assert {res["path"] for res in results} == {results[0]["path"]}
    assert all(res["files"] == want for res in results)
    assert not [p for p in cache.rglob("*") if ".part-" in p.name]  # no temp file left behind

    # A changed object is fetched again, once, by whichever reader gets there first.
    (src / "unet/config.json").write_bytes(b'{"changed": true}')
    storage.upload_dir(src, uri)
    again = _readers(uri, cache, 4)
    assert [r for res in again for r in res["fetched"]] == [f"{s3_bucket}/models/teacher/unet/config.json"]
    assert all(res["files"]["unet/config.json"] == hashlib.sha256(b'{"changed": true}').hexdigest() for res in again)
