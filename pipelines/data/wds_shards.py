"""Prompt shards written with ``webdataset.ShardWriter`` (the reference WebDataset writer).

Same layout and manifest as ``wadi_core.prompts.write_prompt_shards`` (``<key>.txt`` caption +
``<key>.json`` metadata, ``{prefix}-000000.tar`` ..., ``manifest.json``), so every reader of the
prompt lake reads either: ``pipelines.data.tarshards`` (the training reader), Ray's
``read_webdataset`` and ``webdataset.WebDataset``. Lives in ``pipelines`` because webdataset is a
pipeline dependency, not a core one. Tars are reproducible (mtime 0).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from wadi_core import storage
from wadi_core.prompts.shards import MANIFEST, check_sample_key, shard_manifest

__all__ = ["write_prompt_shards_webdataset"]


def write_prompt_shards_webdataset(
    samples: Iterable[tuple[str, str, dict[str, Any]]],
    out_uri: str,
    shard_size: int = 10_000,
    prefix: str = "prompts",
    manifest_extra: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """``(key, caption, metadata)`` samples -> shards under ``out_uri`` (local or ``s3://``); the manifest.

    Drop-in for ``wadi_core.prompts.write_prompt_shards`` (same signature and manifest).
    """
    import webdataset as wds  # noqa: PLC0415 -- webdataset only for WebDataset shards

    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    remote = storage.is_remote(out_uri)
    local = Path(tempfile.mkdtemp(prefix="wadi-wds-")) if remote else Path(out_uri)
    local.mkdir(parents=True, exist_ok=True)
    count = 0
    # maxsize: shards split by count only, as the tarfile writer does
    with wds.ShardWriter(str(local / f"{prefix}-%06d.tar"), maxcount=shard_size, maxsize=float("inf"),
                         verbose=0, mtime=0.0, user="", group="") as sink:
        for key, text, meta in tqdm(samples, desc="shards", disable=not progress, mininterval=5, unit="prompt"):
            check_sample_key(key)
            sink.write({"__key__": key, "txt": text, "json": {"key": key, **meta}})
            count += 1
    shards = sorted(p.name for p in local.glob(f"{prefix}-*.tar"))
    if count == 0:  # ShardWriter leaves an empty first shard behind
        for name in shards:
            (local / name).unlink()
        shards = []
    manifest = shard_manifest(count, shards, shard_size, writer=f"webdataset {wds.__version__}", **(manifest_extra or {}))
    (local / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if remote:
        storage.upload_dir(local, out_uri)
    return manifest
