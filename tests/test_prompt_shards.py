"""Prompt lake: JourneyDB jsonl -> deduped, sorted, seed-shuffled WebDataset shards; COCO captions JSON."""

from __future__ import annotations

import json
import random
import tarfile

import pytest

from wadi_core.prompts import (JourneyDBStats, ensure_embedded_lake, journeydb_to_shards, read_coco_captions,
                               read_manifest, read_prompt_shards, write_coco_captions, iter_journeydb_captions)

ROWS = [
    {"img_path": "./000/a.jpg", "prompt": "x --v 5", "Task2": {"Caption": "A red fox in snow."}},
    {"img_path": "./000/b.jpg", "Task2": {"Caption:": "  A city at night.  "}},
    {"img_path": "./000/c.jpg", "Task2": {"caption": "A red fox in snow."}},  # duplicate
    {"img_path": "./000/d.jpg", "Task2": {"Caption": "   "}},  # empty
    {"img_path": "./000/e.jpg", "Task1": {"Style": []}},  # no caption
    {"img_path": "./000/f.jpg", "Task2": {"Caption": "Zebra on a beach."}},
    {"img_path": "./000/g.jpg", "Task2": {"Caption": "Ants, 3.5 mm."}},
]
EXPECTED_UNIQUE = ["A city at night.", "A red fox in snow.", "Ants, 3.5 mm.", "Zebra on a beach."]


def _write_jsonl(path):
    lines = [json.dumps(r) for r in ROWS]
    lines.insert(3, '{"img_path": "./000/broken.jpg", "Task2": {"Caption": "cut off')  # malformed
    path.write_text("\n".join(lines) + "\n\n")
    return path


def _expected_order():
    order = sorted(EXPECTED_UNIQUE)
    random.Random(2023).shuffle(order)
    return order


def _check(manifest, out):
    assert manifest["rows"] == 8 and manifest["malformed"] == 1
    assert manifest["empty_caption"] == 1 and manifest["missing_caption"] == 1
    assert manifest["duplicates"] == 1 and manifest["unique"] == manifest["num_prompts"] == 4
    assert manifest["num_shards"] == 2 and read_manifest(out) == manifest
    samples = list(read_prompt_shards(out))
    assert [s[1] for s in samples] == _expected_order()
    assert [s[0] for s in samples] == [f"{i:09d}" for i in range(4)]
    assert all("." not in k for k, _, _ in samples)
    assert samples[0][2] == {"key": "000000000", "source": "journeydb", "index": 0}


def test_journeydb_jsonl_round_trip_local(tmp_path):
    src = _write_jsonl(tmp_path / "train_anno.jsonl")
    out = tmp_path / "shards"
    manifest = journeydb_to_shards([str(src)], str(out), shard_size=3)
    _check(manifest, str(out))
    with tarfile.open(out / "journeydb-000000.tar") as tar:
        names = tar.getnames()
    # members of one sample are adjacent: key.txt then key.json
    assert names == ["000000000.txt", "000000000.json", "000000001.txt", "000000001.json",
                     "000000002.txt", "000000002.json"]


def test_journeydb_tgz_to_s3(tmp_path, s3_bucket):
    jsonl = _write_jsonl(tmp_path / "train_anno_realease_repath.jsonl")
    tgz = tmp_path / "train_anno_realease_repath.jsonl.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(jsonl, arcname="train_anno_realease_repath.jsonl")
    out = f"s3://{s3_bucket}/lake/journeydb"
    _check(journeydb_to_shards([str(tgz)], out, shard_size=3), out)


def test_shards_are_byte_reproducible(tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl")
    journeydb_to_shards([str(src)], str(tmp_path / "x"), shard_size=10)
    journeydb_to_shards([str(src)], str(tmp_path / "y"), shard_size=10)
    assert (tmp_path / "x/journeydb-000000.tar").read_bytes() == (tmp_path / "y/journeydb-000000.tar").read_bytes()


def test_streaming_counts_without_sorting(tmp_path):
    stats = JourneyDBStats()
    got = list(iter_journeydb_captions([str(_write_jsonl(tmp_path / "a.jsonl"))], stats))
    assert got == ["A red fox in snow.", "A city at night.", "A red fox in snow.", "Zebra on a beach.", "Ants, 3.5 mm."]
    assert stats.malformed == 1 and stats.captions == 5


def test_coco_captions_round_trip_and_real_layout(tmp_path):
    prompts = ["a small red circle on the left", "a large blue square at the top"]
    write_coco_captions(prompts, str(tmp_path / "c.json"))
    data = json.loads((tmp_path / "c.json").read_text())
    assert set(data) == {"info", "licenses", "images", "annotations"}
    assert set(data["images"][0]) >= {"id", "file_name", "height", "width", "coco_url", "flickr_url",
                                      "date_captured", "license"}
    assert set(data["annotations"][0]) == {"image_id", "id", "caption"}
    assert [c.caption for c in read_coco_captions(str(tmp_path / "c.json"))] == prompts
    # Real COCO: several captions per image, ids out of order.
    real = {"info": {}, "licenses": [], "images": [{"id": 9, "file_name": "COCO_val2014_9.jpg", "height": 480,
                                                    "width": 640}],
            "annotations": [{"image_id": 9, "id": 30, "caption": "B "}, {"image_id": 9, "id": 4, "caption": "A"}]}
    (tmp_path / "real.json").write_text(json.dumps(real))
    assert [c.caption for c in read_coco_captions(str(tmp_path / "real.json"))] == ["A", "B"]
    assert [c.caption_id for c in read_coco_captions(str(tmp_path / "real.json"), first_per_image=True)] == [4]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a COCO captions file"):
        read_coco_captions(str(tmp_path / "bad.json"))


def test_embedded_lake_generated_once(tmp_path):
    from wadi_core.domain import HELDOUT_COMBOS, parse_caption

    lake = ensure_embedded_lake(tmp_path / "lake", num_train=120, num_eval=30, num_heldout=24, shard_size=50)
    manifest = read_manifest(str(lake.train_shards))
    assert manifest["num_prompts"] == 120 and manifest["num_shards"] == 3
    samples = list(read_prompt_shards(str(lake.train_shards)))
    assert all(parse_caption(text) not in HELDOUT_COMBOS for _, text, _ in samples)
    assert samples[0][2]["attributes"] == parse_caption(samples[0][1]).__dict__
    assert len(read_coco_captions(str(lake.eval_captions))) == 30
    assert {parse_caption(c.caption) for c in read_coco_captions(str(lake.heldout_captions))} == set(HELDOUT_COMBOS)
    stamp = (lake.train_shards / "domain-000000.tar").stat().st_mtime_ns
    assert ensure_embedded_lake(tmp_path / "lake", num_train=120, num_eval=30, num_heldout=24, shard_size=50) == lake
    assert (lake.train_shards / "domain-000000.tar").stat().st_mtime_ns == stamp
