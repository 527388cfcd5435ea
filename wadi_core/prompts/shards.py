"""WebDataset tar shards of prompts: ``<key>.txt`` (caption) + ``<key>.json`` (metadata).

Keys contain no dots (Ray splits a key at its first dot) and a sample's members are adjacent.
Shards go to a local folder or an ``s3://`` prefix; ``manifest.json`` is written next to them.
Tars are byte-reproducible (mtime 0, no owner).
"""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

from wadi_core import storage

__all__ = ["write_prompt_shards", "read_prompt_shards", "read_manifest", "check_sample_key", "shard_manifest", "MANIFEST"]

MANIFEST = "manifest.json"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def check_sample_key(key: str) -> None:
    """WebDataset keys: Ray splits a member name at its first dot, and '/' would make a folder."""
    if "." in key or "/" in key or not key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")


def shard_manifest(count: int, shards: list[str], shard_size: int, **extra: Any) -> dict[str, Any]:
    """The ``manifest.json`` every prompt-shard writer leaves beside its shards."""
    return {"num_prompts": count, "num_shards": len(shards), "shard_size": shard_size, "shards": shards, **extra}


def write_prompt_shards(
    samples: Iterable[tuple[str, str, dict[str, Any]]],
    out_uri: str,
    shard_size: int = 10_000,
    prefix: str = "prompts",
    manifest_extra: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``(key, caption, metadata)`` samples as ``{prefix}-000000.tar`` ... under ``out_uri``.

    Returns the manifest (also written to ``out_uri/manifest.json``).
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    shards: list[str] = []
    buf: io.BytesIO | None = None
    tar: tarfile.TarFile | None = None
    count = 0

    def flush() -> None:
        nonlocal buf, tar
        if tar is None or buf is None:
            return
        tar.close()
        name = f"{prefix}-{len(shards):06d}.tar"
        storage.write_bytes(storage.join(out_uri, name), buf.getvalue())
        shards.append(name)
        buf, tar = None, None

    for key, text, meta in tqdm(samples, desc="shards", disable=not progress, mininterval=5, unit="prompt"):
        check_sample_key(key)
        if tar is None:
            buf = io.BytesIO()
            tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT)
        _add(tar, f"{key}.txt", text.encode("utf-8"))
        _add(tar, f"{key}.json", json.dumps({"key": key, **meta}, ensure_ascii=False).encode("utf-8"))
        count += 1
        if count % shard_size == 0:
            flush()
    flush()
    manifest = shard_manifest(count, shards, shard_size, **(manifest_extra or {}))
    storage.write_bytes(storage.join(out_uri, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(uri: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(storage.join(uri, MANIFEST)))


def read_prompt_shards(uri: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Yield ``(key, caption, metadata)`` from every ``.tar`` under ``uri`` (sorted by shard name)."""
    for shard in storage.list_files(uri, ".tar"):
        fs, path = storage.filesystem(shard)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            pending: dict[str, dict[str, Any]] = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                pending.setdefault(key, {})[ext] = data
                if {"txt", "json"} <= pending[key].keys():
                    item = pending.pop(key)
                    yield key, item["txt"].decode("utf-8"), json.loads(item["json"])
