"""One job per run: a lease file in the run's storage folder.

Two jobs with the same ``train.run_name`` and ``train.storage_path`` would resume from the same
checkpoints, train the same steps into the same folders and MLflow run, and delete each other's
checkpoints (``train.keep``). The driver therefore takes ``<storage>/<run_name>/LEASE.json``
before anything else touches the run, renews its heartbeat from a background thread while the
job runs, and deletes it at the end. A second job finds the lease and stops with a message
that names the holder.

Creation is atomic: ``O_CREAT | O_EXCL`` on a local folder (a shared file system included),
``PutObject`` with ``If-None-Match: *`` on S3. A lease whose heartbeat is older than
``stale_after_s`` (its job died without releasing it), or that names a process on this host that
no longer exists, is taken over with a warning.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wadi_core.config import ConfigError
from wadi_core.storage import S3_MAX_ATTEMPTS, is_remote, join, s3_endpoint

__all__ = ["RunLease", "LeaseHeld", "LEASE_FILE"]

LEASE_FILE = "LEASE.json"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 90.0  # six missed heartbeats


class LeaseHeld(ConfigError):
    """Another live job holds the run."""


@dataclass
class _Store:
    """Create-if-absent, overwrite, read and delete of one small object (local file or S3 key)."""

    uri: str

    def _s3(self) -> tuple[Any, str, str]:
        import boto3  # noqa: PLC0415 -- the AWS SDK only for s3:// paths
        import botocore.config  # noqa: PLC0415 -- the AWS SDK only for s3:// paths

        bucket, _, key = self.uri[len("s3://"):].partition("/")
        retries = {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}  # as every other S3 request here
        client = boto3.client("s3", endpoint_url=s3_endpoint(), config=botocore.config.Config(retries=retries))
        return client, bucket, key

    def create(self, data: bytes) -> bool:
        """Write ``data`` only if nothing is there; False if something is."""
        if is_remote(self.uri):
            import botocore.exceptions  # noqa: PLC0415 -- the AWS SDK only for s3:// paths

            client, bucket, key = self._s3()
            try:
                client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                               "ConditionalRequestConflict"):
                    return False
                raise
            return True
        path = Path(self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def write(self, data: bytes) -> None:
        if is_remote(self.uri):
            client, bucket, key = self._s3()
            client.put_object(Bucket=bucket, Key=key, Body=data)
            return
        tmp = Path(f"{self.uri}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.uri)  # a reader never sees half a heartbeat

    def read(self) -> bytes | None:
        if is_remote(self.uri):
            import botocore.exceptions  # noqa: PLC0415 -- the AWS SDK only for s3:// paths

            client, bucket, key = self._s3()
            try:
                return client.get_object(Bucket=bucket, Key=key)["Body"].read()
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
        try:
            return Path(self.uri).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self) -> None:
        if is_remote(self.uri):
            client, bucket, key = self._s3()
            client.delete_object(Bucket=bucket, Key=key)
            return
        Path(self.uri).unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


class RunLease:
    """``with RunLease(storage_path, run_name):`` holds the run for the block, or raises
    :class:`LeaseHeld` naming the job that holds it."""

    def __init__(self, storage_uri: str, run_name: str, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.uri = join(storage_uri, run_name, LEASE_FILE) if is_remote(storage_uri) else \
            str(Path(storage_uri).expanduser() / run_name / LEASE_FILE)
        self.run_name = run_name
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.token = uuid.uuid4().hex
        self._store = _Store(self.uri)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = time.time()

    def _record(self) -> bytes:
        return json.dumps({"owner": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "user": os.environ.get("USER", ""), "run_name": self.run_name,
                           "ray_job_id": os.environ.get("RAY_JOB_ID", ""), "started": self.started,
                           "heartbeat": time.time(), "heartbeat_s": self.heartbeat_s}, indent=1).encode()

    def _why_stale(self, holder: dict[str, Any]) -> str | None:
        """Why the lease ``holder`` may be taken over, or None when its job looks alive."""
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after_s:
            return f"its last heartbeat was {age:.0f} s ago (stale after {self.stale_after_s:g} s)"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on this host is gone"
        return None

    def acquire(self) -> "RunLease":
        for _ in range(3):
            if self._store.create(self._record()):
                break
            raw = self._store.read()
            if raw is None:
                continue  # released in between: try again
            try:
                holder = json.loads(raw)
                assert isinstance(holder, dict)
            except (ValueError, AssertionError):
                holder = {}  # unreadable (a crash mid-write): no heartbeat, so stale
            if holder.get("owner") == self.token:  # our own create, whose answer was lost and retried
                break
            why = self._why_stale(holder)
            if why is None:
                age = time.time() - float(holder.get("heartbeat", 0))
                raise LeaseHeld(
                    f"run {self.run_name!r} is held by another job (host {holder.get('host')}, pid "
                    f"{holder.get('pid')}, user {holder.get('user') or '?'}, Ray job {holder.get('ray_job_id') or '-'}, "
                    f"heartbeat {age:.0f} s ago; lease {self.uri}). Two jobs on one run would train the same steps "
                    "into the same checkpoints. Wait for it to finish, or use another train.run_name; a job that "
                    f"died leaves a lease that goes stale {self.stale_after_s:g} s after its last heartbeat.")
            warnings.warn(f"taking over the lease of run {self.run_name!r} from host {holder.get('host')} pid "
                          f"{holder.get('pid')}: {why}")
            if self._store.read() == raw:  # nobody took it over in the meantime
                self._store.delete()
        else:
            raise LeaseHeld(f"could not take the lease {self.uri} of run {self.run_name!r} (other jobs kept "
                            "taking it): start one job per run")
        self._thread = threading.Thread(target=self._beat, name="wadi-run-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                raw = self._store.read()
                if raw is not None and json.loads(raw).get("owner") != self.token:
                    warnings.warn(f"the lease {self.uri} was taken over by another job: this job's heartbeat "
                                  "stops (was it paused longer than the stale limit?)")
                    return
                self._store.write(self._record())
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried at the next one
                warnings.warn(f"lease heartbeat failed ({type(e).__name__}: {str(e)[:200]}); retrying")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            raw = self._store.read()
            if raw is not None and json.loads(raw).get("owner") == self.token:
                self._store.delete()
        except Exception as e:  # noqa: BLE001 - a lease left behind goes stale on its own
            warnings.warn(f"could not release the lease {self.uri} ({type(e).__name__}: {str(e)[:200]}); "
                          f"it goes stale in {self.stale_after_s:g} s")

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
