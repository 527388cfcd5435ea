"""Streaming reader of JourneyDB annotation files (``train_anno*.jsonl`` or ``.jsonl.tgz``).

One JSON object per line; the caption is ``Task2`` under the key ``Caption``, ``Caption:`` or
``caption`` (real files are not uniform). Rows are streamed one at a time: a 1.4 M-row file is
never held in memory, only the unique caption strings (see ``dedupe_sort_shuffle``).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import random
import tarfile
from typing import IO, Iterable, Iterator

from wadi_core.storage import filesystem

__all__ = ["JourneyDBStats", "iter_annotation_lines", "iter_journeydb_captions", "extract_caption",
           "dedupe_sort_shuffle", "JOURNEYDB_SEED"]

JOURNEYDB_SEED = 2023
_CAPTION_KEYS = ("Caption", "Caption:", "caption")


@dataclasses.dataclass
class JourneyDBStats:
    """Counts kept while streaming (written to the shard manifest)."""

    rows: int = 0
    malformed: int = 0
    missing_caption: int = 0
    empty_caption: int = 0
    captions: int = 0
    unique: int = 0
    duplicates: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _open_uri(uri: str) -> IO[bytes]:
    fs, path = filesystem(uri)
    return fs.open(path, "rb")


def iter_annotation_lines(uri: str | os.PathLike) -> Iterator[bytes]:
    """Raw lines of one annotation file: ``.jsonl``, ``.jsonl.gz``, or a tar(.gz) of ``.jsonl`` files."""
    uri = str(uri)
    with _open_uri(uri) as raw:
        if uri.endswith((".tgz", ".tar.gz", ".tar")):
            # Stream mode ("r|*"): members are read in order, never seeking or loading the archive.
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".jsonl"):
                        f = tar.extractfile(member)
                        if f is not None:
                            yield from f
            return
        stream = gzip.GzipFile(fileobj=raw) if uri.endswith(".gz") else raw
        yield from io.BufferedReader(stream) if uri.endswith(".gz") else stream


def extract_caption(row: object) -> str | None:
    """The Task2 caption of one parsed row, stripped; None when the row has none."""
    if not isinstance(row, dict):
        return None
    task2 = row.get("Task2")
    if not isinstance(task2, dict):
        return None
    for key in _CAPTION_KEYS:
        value = task2.get(key)
        if isinstance(value, str):
            return value.strip()
    return None


def iter_journeydb_captions(uris: Iterable[str | os.PathLike], stats: JourneyDBStats) -> Iterator[str]:
    """Non-empty captions of all rows in ``uris``, in file order; malformed lines are counted and skipped."""
    for uri in uris:
        for line in iter_annotation_lines(uri):
            if not line.strip():
                continue
            stats.rows += 1
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                stats.malformed += 1
                continue
            text = extract_caption(row)
            if text is None:
                stats.missing_caption += 1
            elif not text:
                stats.empty_caption += 1
            else:
                stats.captions += 1
                yield text


def dedupe_sort_shuffle(captions: Iterable[str], stats: JourneyDBStats, seed: int = JOURNEYDB_SEED) -> list[str]:
    """Unique captions, sorted, then shuffled with ``random.Random(seed)`` (the paper's recipe).

    Memory: only the unique strings are held (a set, then one list): about 2x the caption bytes
    plus ~60 B per string, i.e. ~0.5 GB for JourneyDB's 1.42 M captions; the rows themselves
    (several kB each with Task1/Task3) are streamed.
    """
    unique: set[str] = set()
    for text in captions:
        if text in unique:
            stats.duplicates += 1
        else:
            unique.add(text)
    ordered = sorted(unique)
    del unique
    random.Random(seed).shuffle(ordered)
    stats.unique = len(ordered)
    return ordered
