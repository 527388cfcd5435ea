"""Local paths and ``s3://`` URIs behind one small API.

S3 endpoint and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) or the usual AWS
config files; nothing here logs them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from tqdm.auto import tqdm

__all__ = [
    "is_remote",
    "filesystem",
    "materialize",
    "upload_dir",
    "read_bytes",
    "write_bytes",
    "list_files",
    "join",
    "default_cache_dir",
    "cache_path",
    "UnsafeKeyError",
    "retry_io",
    "StorageFull",
    "is_storage_full",
]


def is_remote(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with forward slashes."""
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str | os.PathLike) -> tuple[Any, str]:
    """Return ``(fsspec filesystem, path without scheme)`` for a local path or s3 URI."""
    import fsspec  # noqa: PLC0415 -- fsspec only for remote paths

    uri = str(uri)
    if is_remote(uri):
        kwargs: dict[str, Any] = {}
        endpoint = s3_endpoint()
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        # botocore retries 5xx / throttling / connection errors with backoff (standard mode).
        kwargs["config_kwargs"] = {"retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                                   "connect_timeout": 10, "read_timeout": 120}
        fs = fsspec.filesystem("s3", skip_instance_cache=False, **kwargs)
        return fs, uri[len("s3://"):].rstrip("/")
    return fsspec.filesystem("file"), str(Path(uri).expanduser().resolve())


#: Attempts per S3 request (botocore) and per file upload (``upload_dir``, on top of botocore's).
S3_MAX_ATTEMPTS = 8
UPLOAD_ATTEMPTS = 4


class StorageFull(OSError):
    """A write failed because the storage has no space left (ENOSPC): retrying cannot help."""


def is_storage_full(e: BaseException) -> bool:
    """``e`` (or what it was raised from) says the storage is full: ENOSPC, EDQUOT, or pyarrow's
    and s3fs's text for them."""
    while e is not None:
        if isinstance(e, StorageFull) or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
                "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def retry_io(fn: Any, what: str, attempts: int = UPLOAD_ATTEMPTS, base_s: float = 0.5) -> Any:
    """``fn()`` retried on ``OSError`` (what s3fs raises for a failed request) with exponential
    backoff; the last error is raised with ``what`` and the number of attempts. A full storage is
    not retried: :class:`StorageFull` at once."""
    for attempt in range(attempts):
        try:
            return fn()
        except OSError as e:
            if is_storage_full(e):
                raise StorageFull(errno.ENOSPC, f"storage is full: {what} failed ({type(e).__name__}: "
                                                f"{str(e)[:300]})") from e
            if attempt + 1 == attempts:
                raise OSError(f"{what} failed {attempts} times, last: {type(e).__name__}: {e}") from e
            warnings.warn(f"{what} failed ({type(e).__name__}: {str(e)[:200]}), retrying")
            time.sleep(min(base_s * 2 ** attempt, 16.0))
    return None


def default_cache_dir() -> Path:
    return Path(os.environ.get("WADI_CACHE", Path.home() / ".cache" / "wadi"))


class UnsafeKeyError(ValueError):
    """An object key would land outside the local cache folder (absolute, or contains ``..``)."""


def cache_path(root: str | os.PathLike, key: str) -> Path:
    """``root / key`` for an object key relative to the mirrored prefix, refused if it could escape.

    Keys that are absolute or have a ``..`` (or empty) component are refused, and the joined path
    is checked to stay inside ``root`` after resolving symlinks.
    """
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise UnsafeKeyError(
            f"refusing object key {key!r}: keys that are absolute or contain '..', '.' or empty parts "
            "could be written outside the cache folder; rename or delete that object"
        )
    root = Path(root).resolve()
    dest = (root / key).resolve()
    if not dest.is_relative_to(root):
        raise UnsafeKeyError(f"refusing object key {key!r}: it resolves to {dest}, outside the cache {root}")
    return dest


def _etag(info: dict[str, Any]) -> str:
    return str(info.get("ETag") or info.get("etag") or "").strip('"')


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _fetch(fs: Any, remote: str, dest: Path, etag: str) -> dict[str, Any]:
    """Download to a temporary file, check the MD5 when the ETag is one, then move into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        retry_io(lambda: fs.get(remote, str(tmp)), f"download of {remote}")
        # A single-part upload's ETag is the MD5 of the object (multipart ones end in "-<parts>").
        if re.fullmatch(r"[0-9a-f]{32}", etag):
            md5 = hashlib.md5(usedforsecurity=False)
            with open(tmp, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    md5.update(chunk)
            if md5.hexdigest() != etag:
                raise OSError(f"download of {remote} is corrupt (MD5 {md5.hexdigest()} != ETag {etag}): retry")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    st = dest.stat()
    return {"etag": etag, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _valid(entry: Any, dest: Path, etag: str) -> bool:
    """A cached file is reused only if the object's ETag is the one it was downloaded with and the
    local file is the one written then (size and mtime); an object without an ETag is re-read."""
    if not etag or not isinstance(entry, dict) or entry.get("etag") != etag:
        return False
    try:
        st = dest.stat()
    except OSError:
        return False
    return st.st_size == entry.get("size") and st.st_mtime_ns == entry.get("mtime_ns")


@contextlib.contextmanager
def _node_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on ``path`` between the processes (and threads) of one machine.

    Eight train workers on a node materialise the same teacher at once: the first one to get the
    lock downloads, the others wait and then find every file in place (ETag and size checked), so
    each object is fetched once per node. ``flock`` on a fresh open file description, released
    by the kernel if the holder dies. Without ``fcntl`` (not POSIX) each process downloads on its
    own; the temp-file + rename still keeps every cached file whole.
    """
    try:
        import fcntl  # noqa: PLC0415 -- POSIX only: without it (Windows) each process downloads
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[wadi] waiting for another process on this machine to download {what}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def materialize(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a local path holding the content of ``uri``.

    Local paths are returned as they are. An ``s3://`` prefix (or object) is mirrored into
    ``cache_dir/<hash of uri>``; a cached file is reused only while the object's ETag is the one
    recorded when it was downloaded (``<hash>.json`` beside the folder). Processes of one machine
    sharing the cache download each object once: one holds ``<hash>.lock`` while it checks and
    fetches, the others wait for it. Each file is written to a temp file and renamed into place.
    Object keys that would land outside the cache (absolute, ``..``) raise ``UnsafeKeyError``.
    """
    if not is_remote(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass a local path or an s3:// URI")
        return path
    digest = hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    cache = Path(cache_dir or default_cache_dir())
    with _node_lock(cache / f"{digest}.lock", str(uri)):
        return _mirror(str(uri), cache, digest)


def _mirror(uri: str, cache: Path, digest: str) -> Path:
    """``materialize``'s work, under the node lock: list, compare with the manifest, fetch what changed."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)  # fresh ETags: the objects may have changed since this process listed them
    root = cache / digest
    manifest_path = cache / f"{digest}.json"
    manifest = _read_manifest(manifest_path)  # read under the lock: another process may just have written it
    if fs.isfile(path):
        items = [(path, path.rsplit("/", 1)[-1], fs.info(path))]
        result = None
    else:
        infos = fs.find(path, detail=True)
        items = []
        for f in sorted(infos):
            if f.endswith("/") or infos[f].get("type") == "directory":
                continue
            if not f.startswith(path + "/"):
                raise UnsafeKeyError(f"refusing object {f!r}: it is not under {uri}")
            items.append((f, f[len(path) + 1:], infos[f]))
        if not items:
            raise FileNotFoundError(f"nothing found under {uri}: check the bucket, prefix and AWS_ENDPOINT_URL")
        result = root
    dests = [(f, key, cache_path(root, key), info) for f, key, info in items]  # all checked before any write
    todo = [(f, key, dest, info) for f, key, dest, info in dests if not _valid(manifest.get(key), dest, _etag(info))]

    with tqdm(total=sum(int(info.get("size") or 0) for *_, info in todo), unit="B", unit_scale=True,
              desc=f"download {uri}", disable=not todo, mininterval=2) as bar:
        for f, key, dest, info in todo:
            manifest[key] = _fetch(fs, f, dest, _etag(info))
            bar.update(int(info.get("size") or 0))
    if todo:
        tmp = manifest_path.with_name(f".{manifest_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=0, sort_keys=True))
        os.replace(tmp, manifest_path)
    return result if result is not None else dests[0][2]


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local path or s3 prefix)."""
    local_dir = Path(local_dir)
    fs, path = filesystem(uri)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            target = f"{path}/{f.relative_to(local_dir).as_posix()}"
            if not is_remote(uri):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            retry_io(lambda: fs.put(str(f), target), f"upload of {f.name} to {uri}")  # noqa: B023


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def list_files(uri: str | os.PathLike, suffix: str = "") -> list[str]:
    """Sorted full URIs (or local paths) of files under ``uri`` ending in ``suffix``."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    found = sorted(f for f in fs.find(path) if f.endswith(suffix))
    if is_remote(uri):
        return [f"s3://{f}" for f in found]
    return found


def load_component_weights(pipeline_dir: str | os.PathLike, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The safetensors weights and ``config.json`` of one component folder of a saved diffusers
    pipeline (``unet``, ``vae``, ``text_encoder``...); an fp16 variant is used only when alone."""
    from safetensors.torch import load_file  # noqa: PLC0415 -- torch only here; the module imports without it

    sub = Path(pipeline_dir) / name
    files = sorted(sub.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{sub} has no .safetensors weights: save the pipeline with "
                                f"save_pretrained(..., safe_serialization=True)")
    if any(".fp16." in f.name for f in files) and len(files) > 1:
        files = [f for f in files if ".fp16." not in f.name]
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state, json.loads((sub / "config.json").read_text())
