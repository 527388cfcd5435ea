"""Prompt shards: the fast tar parser, bad-record accounting, Ray Data reads (local and S3)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.data.prompts import PromptStream, parse_shard_batch
from wadi_core.prompts.shards import BAD_REASONS, bad_code, bad_reason, parse_prompt_tar, prompt_shard_bytes

CAPTIONS = [f"a {c} {s} on the left" for c in ("red", "blue", "green") for s in ("circle", "square")]


def _samples(n: int = 6, start: int = 0):
    return [(f"{start + i:09d}", CAPTIONS[i % len(CAPTIONS)], {"i": start + i}) for i in range(n)]


def _shard_bytes(tmp_path: Path, samples) -> bytes:
    return prompt_shard_bytes(samples)


def test_writer_output_is_a_standard_tar(tmp_path: Path) -> None:
    data = _shard_bytes(tmp_path, _samples(3))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == [f"{i:09d}.{e}" for i in range(3) for e in ("txt", "json")]
        assert tar.extractfile("000000001.txt").read().decode() == CAPTIONS[1]
    with pytest.raises(ValueError, match="without '.' or '/'"):
        prompt_shard_bytes([("a.b", "x", None)])


def test_writer_bytes_are_tarfiles_ustar_bytes() -> None:
    """The one writer keeps the lake's on-disk format: the bytes the earlier ``tarfile`` (USTAR,
    mtime 0, mode 644) writer produced, up to tarfile's zero padding to a 10 KiB record."""
    samples = [(f"{i:09d}", c, {"i": i, "note": "ünï"}) for i, c in enumerate(CAPTIONS)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, text, meta in samples:
            for name, data in ((f"{key}.txt", text.encode()),
                               (f"{key}.json", json.dumps({"key": key, **meta}, ensure_ascii=False).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    ours, theirs = prompt_shard_bytes(samples), buf.getvalue()
    assert theirs[: len(ours)] == ours and not theirs[len(ours):].strip(b"\0")


def test_read_prompt_shards_refuses_a_damaged_shard(tmp_path: Path) -> None:
    from wadi_core.prompts import read_prompt_shards, write_prompt_shards

    write_prompt_shards(_samples(4), str(tmp_path), shard_size=4)
    shard = tmp_path / "prompts-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # inside the first caption's data block: header checksums still hold ...
    data[0] ^= 0x01    # ... but not the first header's
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="prompt shard .*prompts-000000.tar is damaged"):
        list(read_prompt_shards(str(tmp_path)))


def test_parser_matches_the_shared_shard_writer(tmp_path: Path) -> None:
    from wadi_core.prompts import write_prompt_shards

    write_prompt_shards(_samples(7), str(tmp_path / "lake"), shard_size=5)
    shards = sorted((tmp_path / "lake").glob("*.tar"))
    got = [c for s in shards for c in parse_prompt_tar(s.read_bytes()).captions]
    assert got == [s[1] for s in _samples(7)]


def test_gnu_and_pax_long_names(tmp_path: Path) -> None:
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for key, text in (("d" * 120, "long key caption"), ("short", "short caption")):
                for ext, data in (("txt", text.encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        parsed = parse_prompt_tar(buf.getvalue())
        assert parsed.captions == ["long key caption", "short caption"] and not parsed.error


def test_bad_codes_name_each_reason_once() -> None:
    """The lake table's ``bad`` column: 0 is a good row, each reason its own code from 1, read back to its name."""
    codes = [bad_code(r) for r in BAD_REASONS]
    assert codes == list(range(1, len(BAD_REASONS) + 1))
    assert [bad_reason(c) for c in codes] == list(BAD_REASONS)
    assert bad_reason(bad_code("undecodable", ("corrupt_shard", "undecodable")), ("corrupt_shard", "undecodable")) \
        == "undecodable"
    with pytest.raises(ValueError):
        bad_code("no_such_reason")


def test_bad_records_are_counted_not_raised(tmp_path: Path) -> None:
    samples = _samples(4)
    samples[1] = (samples[1][0], "   ", {})  # empty caption
    data = bytearray(_shard_bytes(tmp_path, samples))
    parsed = parse_prompt_tar(bytes(data))
    assert parsed.captions == [samples[i][1] for i in (0, 2, 3)]
    assert parsed.bad == {**dict.fromkeys(BAD_REASONS, 0), "empty_caption": 1}

    # A caption that is not UTF-8 (same length, so the tar stays valid).
    bad_utf8 = bytes(data).replace(CAPTIONS[2].encode(), b"\xff" * len(CAPTIONS[2]), 1)
    assert parse_prompt_tar(bad_utf8).bad["undecodable"] == 1

    # A sample with only a .json member.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("000000009.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    assert parse_prompt_tar(buf.getvalue()).bad["missing_caption"] == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "bitflip"])
def test_corrupt_shards_keep_what_came_before(tmp_path: Path, damage: str) -> None:
    data = _shard_bytes(tmp_path, _samples(8))
    if damage == "truncated":
        data = data[: 2048 * 4 + 512 + 100]  # 4 blocks per sample: inside the 5th caption
    elif damage == "garbage":
        data = b"this is not a tar archive at all" * 64
    elif damage == "empty":
        data = b""
    else:
        flipped = bytearray(data)
        flipped[2048 * 4 + 3] ^= 0x20  # a header byte of the 5th sample: checksum mismatch
        data = bytes(flipped)
    parsed = parse_prompt_tar(data)
    assert parsed.bad["corrupt_shard"] == 1 and parsed.error
    kept = {"truncated": 4, "garbage": 0, "empty": 0, "bitflip": 4}[damage]
    assert parsed.captions == [s[1] for s in _samples(8)][:kept]


def test_parse_shard_batch_marks_bad_rows(tmp_path: Path) -> None:
    good = _shard_bytes(tmp_path, _samples(3))
    table = parse_shard_batch(pa.table({"bytes": pa.array([good, b"garbage" * 100], pa.binary())}))
    assert table.column("caption").to_pylist()[:3] == CAPTIONS[:3]
    assert table.column("bad").to_pylist() == [0, 0, 0, bad_code("corrupt_shard")]


class _FakeShard:
    """Stands in for a Ray DataIterator: iter_batches over pyarrow tables (or their numpy form)."""

    def __init__(self, tables: list[pa.Table], extra: list[dict] | None = None):
        self.tables = tables
        self.extra = extra or [{} for _ in tables]

    def iter_batches(self, batch_format: str = "default", **_: object):
        for table, extra in zip(self.tables, self.extra):
            if batch_format == "numpy":
                yield {**{k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}, **extra}
            else:
                yield table


def test_prompt_stream_rebatches_skips_and_counts() -> None:
    rows = [(f"p{i}", 0) for i in range(10)]
    rows.insert(3, ("", bad_code("empty_caption")))
    rows.insert(7, ("", bad_code("corrupt_shard")))
    table = pa.table({"caption": [r[0] for r in rows], "bad": pa.array([r[1] for r in rows], pa.uint8())})
    shard = _FakeShard([table.slice(0, 5), table.slice(5)])

    stream = PromptStream(batch_size=3)
    assert list(stream.batches(shard)) == [["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6", "p7", "p8"]]
    assert stream.counters() == {**dict.fromkeys(BAD_REASONS, 0), "empty_caption": 1, "corrupt_shard": 1}

    resumed = PromptStream(batch_size=3)
    assert list(resumed.batches(shard, skip=2)) == [["p6", "p7", "p8"]]
    assert resumed.counters()["corrupt_shard"] == 1  # skipped rows are still counted (once per epoch)


def test_prompt_stream_carries_streamed_embeddings_with_their_captions() -> None:
    """data.text_encoding=actors: rows carry embeddings (bf16 bits) and T5 masks; batches keep
    each caption with its own row after bad rows are dropped and batches re-cut."""
    import numpy as np
    import torch

    from pipelines.data.text_encoding import EncodedPrompts, to_numpy

    codes = [0, 0, bad_code("empty_caption"), 0, 0, 0, 0]
    caps = ["p0", "p1", "", "p2", "p3", "p4", "p5"]
    embeds = torch.arange(len(caps) * 2 * 3, dtype=torch.float32).reshape(len(caps), 2, 3).to(torch.bfloat16)
    mask = np.array([[1, i % 2] for i in range(len(caps))], dtype=np.uint8)
    table = pa.table({"caption": caps, "bad": pa.array(codes, pa.uint8())})
    blocks = [(0, 4), (4, 7)]
    shard = _FakeShard([table.slice(a, b - a) for a, b in blocks],
                       [{"embeds": to_numpy(embeds[a:b]), "mask": mask[a:b]} for a, b in blocks])
    stream = PromptStream(batch_size=2)
    batches = list(stream.batches(shard, skip=1))
    assert [b.captions for b in batches] == [["p2", "p3"], ["p4", "p5"]]
    assert all(isinstance(b, EncodedPrompts) for b in batches)
    cond = batches[0].cond("cpu", torch.float32)
    assert torch.equal(cond.embeds, embeds[[3, 4]].float()) and cond.mask.tolist() == [[1, 1], [1, 0]]
    assert stream.counters()["empty_caption"] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_ray_data_reads_local_and_s3_and_skips_a_corrupt_shard(tmp_path: Path, s3_bucket: str) -> None:
    ray = pytest.importorskip("ray")
    from wadi_core import storage
    from wadi_core.prompts import write_prompt_shards

    from pipelines.data.prompts import count_prompts, prompt_dataset

    local = tmp_path / "lake"
    write_prompt_shards(_samples(25), str(local), shard_size=10)
    (local / "zz-broken.tar").write_bytes(b"\x00garbage" * 300)
    remote = f"s3://{s3_bucket}/lake"
    storage.upload_dir(local, remote)
    assert count_prompts(remote) == 25

    from pipelines.runtime.cluster import init_ray

    init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for uri in (str(local), remote):
            rows = prompt_dataset(uri, seed=0, epoch=0).take_all()
            good = sorted(r["caption"] for r in rows if r["bad"] == 0)
            assert good == sorted(s[1] for s in _samples(25))
            assert [r["bad"] for r in rows if r["bad"]] == [bad_code("corrupt_shard")]
    finally:
        ray.shutdown()
