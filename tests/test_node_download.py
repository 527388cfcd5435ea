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

# Each reader counts the downloads it does itself (wrapping storage._fetch). The readers are made
# to overlap by marker files in a shared folder, not by timing:
# - "arrived": all readers enter materialize() together (a barrier);
# - "read": having read the cache manifest (storage._read_manifest, done under the node lock), a
#   reader holds on (and holds the lock, if any) until every other reader is blocked on the lock
#   ("blocked", written just before the blocking flock), has read the manifest too, or is "done".
# With the lock, the first holder waits until the 3 others are blocked on it, and reports it
# ("blocked_seen"). Without it, all 4 read the same manifest before any fetch, so each one fetches
# every object: the test's "nolock" control checks that this set-up does catch a missing lock.
READER = r"""
import contextlib, fcntl, hashlib, json, os, sys, time
from pathlib import Path

from wadi_core import storage

uri, cache, sync, n, mode = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
me = str(os.getpid())

def mark(kind):
    (sync / f"{kind}.{me}").touch()

def others(kind):
    return {p.name.split(".", 1)[1] for p in sync.glob(kind + ".*")} - {me}

def wait_until(cond, what, timeout=90.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"reader {me}: timed out waiting for {what}")
        time.sleep(0.01)

fetched = []
real_fetch = storage._fetch
def counting_fetch(fs, remote, dest, etag):
    fetched.append(remote)
    return real_fetch(fs, remote, dest, etag)
storage._fetch = counting_fetch

real_flock = fcntl.flock
def flock(f, op):
    if op == fcntl.LOCK_EX:  # the blocking call, made once LOCK_NB found the lock held
        mark("blocked")
    return real_flock(f, op)
fcntl.flock = flock

blocked_seen = []
real_read = storage._read_manifest
def read_manifest(path):
    manifest = real_read(path)
    mark("read")
    wait_until(lambda: len(others("blocked") | others("read") | others("done")) == n - 1,
               "the other readers to block on the lock or read the manifest")
    blocked_seen.append(len(others("blocked") - others("read") - others("done")))
    return manifest
storage._read_manifest = read_manifest

if mode == "nolock":  # the control: the node lock replaced by a no-op
    storage._node_lock = lambda path, what: contextlib.nullcontext()

mark("arrived")
wait_until(lambda: len(others("arrived")) == n - 1, "all readers to start")
local = storage.materialize(uri, cache_dir=cache)
mark("done")
files = {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest()
         for p in sorted(local.rglob("*")) if p.is_file()}
print(json.dumps({"fetched": fetched, "blocked_seen": blocked_seen, "path": str(local), "files": files}))
"""


def _readers(uri: str, cache: Path, sync: Path, n: int, mode: str = "lock") -> list[dict]:
    sync.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", READER, uri, str(cache), str(sync), str(n), mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
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
    keys = sorted(f"{s3_bucket}/models/teacher/{k}" for k in blobs)

    cache = tmp_path / "node-cache"
    results = _readers(uri, cache, tmp_path / "sync1", 4)
    # They overlapped: one reader held the lock while the 3 others were blocked on it.
    assert max(s for res in results for s in res["blocked_seen"]) == 3, results
    fetched = [r for res in results for r in res["fetched"]]
    assert sorted(fetched) == keys, fetched  # once each
    assert {res["path"] for res in results} == {results[0]["path"]}
    assert all(res["files"] == want for res in results)
    assert not [p for p in cache.rglob("*") if ".part-" in p.name]  # no temp file left behind

    # A changed object is fetched again, once, by whichever reader gets there first.
    (src / "unet/config.json").write_bytes(b'{"changed": true}')
    storage.upload_dir(src, uri)
    again = _readers(uri, cache, tmp_path / "sync2", 4)
    assert max(s for res in again for s in res["blocked_seen"]) == 3, again
    assert [r for res in again for r in res["fetched"]] == [f"{s3_bucket}/models/teacher/unet/config.json"]
    assert all(res["files"]["unet/config.json"] == hashlib.sha256(b'{"changed": true}').hexdigest() for res in again)

    # Control: the same overlapping readers with the node lock made a no-op each fetch every object,
    # so the "once each" above is the lock's doing, not the readers missing each other.
    nolock = _readers(uri, tmp_path / "cache-nolock", tmp_path / "sync3", 4, mode="nolock")
    assert sorted(r for res in nolock for r in res["fetched"]) == sorted(keys * 4)
    assert all(res["files"]["unet/config.json"] == hashlib.sha256(b'{"changed": true}').hexdigest() for res in nolock)
