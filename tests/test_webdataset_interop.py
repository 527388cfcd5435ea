"""Prompt shards interoperate with the reference WebDataset library, both ways.

Shards written by ``webdataset.ShardWriter`` (pipelines.data.wds_shards, jobs/make_prompt_shards.py's
default) are read by our fast training reader (pipelines.data.tarshards.parse_prompt_tar) and by
wadi_core's reader with the same captions; shards written by our writers are read by
``webdataset.WebDataset``.
"""

from __future__ import annotations

import json

import pytest

wds = pytest.importorskip("webdataset")

from pipelines.data.tarshards import parse_prompt_tar, write_prompt_shard  # noqa: E402
from pipelines.data.wds_shards import write_prompt_shards_webdataset  # noqa: E402
from wadi_core.prompts import read_prompt_shards, write_prompt_shards  # noqa: E402

CAPTIONS = ["a large red circle on the left", "ünïcödé prompt, with commas", "x" * 3000, "", "tab\there\nnewline"]


def _samples(n: int = 23):
    return [(f"{i:09d}", CAPTIONS[i % len(CAPTIONS)] + f" #{i}", {"index": i}) for i in range(n)]


def _wds_captions(urls: list[str]) -> list[tuple[str, str, dict]]:
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    return [(s["__key__"], s["txt"], s["json"]) for s in ds]


def test_shardwriter_shards_read_by_our_readers(tmp_path):
    samples = _samples()
    manifest = write_prompt_shards_webdataset(samples, str(tmp_path), shard_size=10, prefix="p")
    assert manifest["num_prompts"] == 23 and manifest["num_shards"] == 3
    assert manifest["shards"] == ["p-000000.tar", "p-000001.tar", "p-000002.tar"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest

    parsed = [parse_prompt_tar((tmp_path / s).read_bytes(), max_caption_bytes=10_000) for s in manifest["shards"]]
    assert all(p.error == "" and not any(p.bad.values()) for p in parsed)
    # the training reader strips surrounding whitespace of captions (its own normalisation)
    assert [c for p in parsed for c in p.captions] == [text.strip() for _, text, _ in samples]
    assert [(k, t, m["index"]) for k, t, m in read_prompt_shards(str(tmp_path))] == \
        [(k, t, m["index"]) for k, t, m in samples]
    # reproducible bytes (mtime 0, no owner names)
    again = write_prompt_shards_webdataset(samples, str(tmp_path / "again"), shard_size=10, prefix="p")
    assert all((tmp_path / s).read_bytes() == (tmp_path / "again" / s).read_bytes() for s in again["shards"])


def test_our_shards_read_by_webdataset(tmp_path):
    samples = _samples(12)
    # the training-side fast writer (one shard) ...
    fast = tmp_path / "fast.tar"
    write_prompt_shard(fast, [(k, t, {"key": k, **m}) for k, t, m in samples])
    got = _wds_captions([str(fast)])
    assert [(k, t, m["index"]) for k, t, m in got] == [(k, t, m["index"]) for k, t, m in samples]
    # ... and wadi_core's lake writer (several shards + manifest)
    manifest = write_prompt_shards(samples, str(tmp_path / "lake"), shard_size=5, prefix="q")
    got = _wds_captions([str(tmp_path / "lake" / s) for s in manifest["shards"]])
    assert [(k, t) for k, t, _ in got] == [(k, t) for k, t, _ in samples]


def test_make_prompt_shards_job_uses_shardwriter(tmp_path, capsys):
    from jobs.make_prompt_shards import main

    main(["domain", "num=25", "shard_size=10", "eval_num=0", f"out={tmp_path / 'wds'}"])
    main(["domain", "num=25", "shard_size=10", "eval_num=0", "writer=tarfile", f"out={tmp_path / 'tar'}"])
    m_wds = json.loads((tmp_path / "wds" / "manifest.json").read_text())
    assert m_wds["writer"].startswith("webdataset") and m_wds["num_shards"] == 3
    assert list(read_prompt_shards(str(tmp_path / "wds"))) == list(read_prompt_shards(str(tmp_path / "tar")))
