"""Metric weights come from a local path or ``s3://``; never downloaded from a hub."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from wadi_core import storage

__all__ = ["resolve_weights", "sha256_file"]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_weights(uri: str | os.PathLike, what: str, expected_sha256: str | None = None) -> tuple[Path, str]:
    """Local file for ``uri`` (s3 objects are cached) and its sha256; checks ``expected_sha256``."""
    try:
        path = storage.materialize(uri)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{what} weights not found at {uri}: weights are never downloaded here; copy the file "
            "to a local path or an s3:// bucket and pass that") from e
    if path.is_dir():
        raise IsADirectoryError(f"{what} weights must be a single file, got directory {path}")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256.lower():
        raise ValueError(f"{what} weights {uri} have sha256 {digest}, expected {expected_sha256}")
    return path, digest
