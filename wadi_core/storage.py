"""Local paths and ``s3://`` URIs behind one small API.

S3 endpoint and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``) or the usual AWS
config files; nothing here logs them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

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
    import fsspec

    uri = str(uri)
    if is_remote(uri):
        kwargs: dict[str, Any] = {}
        endpoint = s3_endpoint()
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        fs = fsspec.filesystem("s3", skip_instance_cache=False, **kwargs)
        return fs, uri[len("s3://"):].rstrip("/")
    return fsspec.filesystem("file"), str(Path(uri).expanduser().resolve())


def default_cache_dir() -> Path:
    return Path(os.environ.get("WADI_CACHE", Path.home() / ".cache" / "wadi"))


def materialize(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a local path holding the content of ``uri``.

    Local paths are returned as they are. An ``s3://`` prefix (or object) is mirrored into
    ``cache_dir/<hash of uri>``; files whose size already matches are not downloaded again.
    """
    if not is_remote(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass a local path or an s3:// URI")
        return path
    fs, path = filesystem(uri)
    root = Path(cache_dir or default_cache_dir()) / hashlib.sha256(str(uri).encode()).hexdigest()[:16]
    if fs.isfile(path):
        dest = root / Path(path).name
        if not dest.exists() or dest.stat().st_size != fs.size(path):
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get(path, str(dest))
        return dest
    files = [f for f in fs.find(path) if not f.endswith("/")]
    if not files:
        raise FileNotFoundError(f"nothing found under {uri}: check the bucket, prefix and AWS_ENDPOINT_URL")
    for f in files:
        rel = f[len(path):].lstrip("/")
        dest = root / rel
        if dest.exists() and dest.stat().st_size == fs.size(f):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get(f, str(dest))
    return root


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local path or s3 prefix)."""
    local_dir = Path(local_dir)
    fs, path = filesystem(uri)
    for f in sorted(local_dir.rglob("*")):
        if f.is_file():
            target = f"{path}/{f.relative_to(local_dir).as_posix()}"
            if not is_remote(uri):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            fs.put(str(f), target)


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
