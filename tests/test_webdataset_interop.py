"""Prompt shards interoperate with the reference WebDataset library, both ways.

Shards written by ``webdataset.ShardWriter`` are read by the lake's one reader
(``wadi_core.prompts.shards.parse_prompt_tar``, and ``read_prompt_shards`` on top of it) with the
same captions; shards written by the lake's one writer (``write_prompt_shards``, the job
``jobs/make_prompt_shards.py``) are read by ``webdataset.WebDataset``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

wds = pytest.importorskip("webdataset")

from wadi_core.prompts import read_prompt_shards, write_prompt_shards  # noqa: E402
from wadi_core.prompts.shards import parse_prompt_tar, prompt_shard_bytes  # noqa: E402

CAPTIONS = ["a large red circle on the left", "ünïcödé prompt, with commas", "x" * 3000, "", "tab\there\nnewline"]


def _samples(n: int = 23):
    return [(f"{i:09d}", CAPTIONS[i % len(CAPTIONS)] + f" #{i}", {"index": i}) for i in range(n)]


def _wds_captions(urls: list[str]) -> list[tuple[str, str, dict]]:
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    return [(s["__key__"], s["txt"], s["json"]) for s in ds]


def _write_with_shardwriter(samples, out: Path, shard_size: int) -> list[str]:
    """The reference writer: ``webdataset.ShardWriter``, reproducible (mtime 0, no owner)."""
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "p-%06d.tar"), maxcount=shard_size, maxsize=float("inf"), verbose=0,
                         mtime=0.0, user="", group="") as sink:
        for key, text, meta in samples:
            sink.write({"__key__": key, "txt": text, "json": {"key": key, **meta}})
    return sorted(p.name for p in out.glob("p-*.tar"))


def test_shardwriter_shards_read_by_our_reader(tmp_path):
    samples = _samples()
    shards = _write_with_shardwriter(samples, tmp_path, shard_size=10)
    assert shards == ["p-000000.tar", "p-000001.tar", "p-000002.tar"]

    parsed = [parse_prompt_tar((tmp_path / s).read_bytes(), max_caption_bytes=10_000) for s in shards]
    assert all(p.error == "" and not any(p.bad.values()) for p in parsed)
    # the training reader strips surrounding whitespace of captions (its own normalisation)
    assert [c for p in parsed for c in p.captions] == [text.strip() for _, text, _ in samples]
    assert [(k, t, m["index"]) for k, t, m in read_prompt_shards(str(tmp_path))] == \
        [(k, t, m["index"]) for k, t, m in samples]


def test_our_shards_read_by_webdataset(tmp_path):
    samples = _samples(12)
    # one shard's bytes ...
    fast = tmp_path / "fast.tar"
    fast.write_bytes(prompt_shard_bytes(samples))
    got = _wds_captions([str(fast)])
    assert [(k, t, m["index"]) for k, t, m in got] == [(k, t, m["index"]) for k, t, m in samples]
    # ... and the lake writer (several shards + manifest)
    manifest = write_prompt_shards(samples, str(tmp_path / "lake"), shard_size=5, prefix="q")
    got = _wds_captions([str(tmp_path / "lake" / s) for s in manifest["shards"]])
    assert [(k, t) for k, t, _ in got] == [(k, t) for k, t, _ in samples]


def test_make_prompt_shards_job_writes_shards_webdataset_reads(tmp_path, capsys):
    from jobs.make_prompt_shards import main

    main(["domain", "num=25", "shard_size=10", "eval_num=0", f"out={tmp_path / 'lake'}"])
    manifest = json.loads((tmp_path / "lake" / "manifest.json").read_text())
    assert manifest["num_prompts"] == 25 and manifest["num_shards"] == 3
    ours = list(read_prompt_shards(str(tmp_path / "lake")))
    theirs = _wds_captions([str(tmp_path / "lake" / s) for s in manifest["shards"]])
    assert [(k, t, m) for k, t, m in ours] == [(k, t, m) for k, t, m in theirs] and len(ours) == 25
