"""Inputs and boundaries: hostile S3 keys, crafted tar shards, secrets in URIs, config
and preflight checks, Ray address selection. Every input is crafted here; nothing is downloaded.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from wadi_core import storage
from wadi_core.config import ConfigError

from wadi_core.prompts.shards import BAD_REASONS, BLOCK, bad_code, parse_prompt_tar, prompt_shard_bytes


SECRET = "wJalr/XUtnFEMI+K7MDENG"  # looks like an AWS secret key: it contains "/" and "+"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# storage: keys that escape the cache, cache validity by ETag


@pytest.mark.parametrize("key", ["../evil", "a/../../evil", "/etc/passwd", "a//b", "./a", "a/./b", "..", "a\\..\\b"])
def test_cache_path_refuses_keys_that_could_escape(tmp_path: Path, key: str) -> None:
    with pytest.raises(storage.UnsafeKeyError, match="refusing object key"):
        storage.cache_path(tmp_path / "cache", key)


def test_cache_path_stays_inside_through_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / "sub").mkdir(parents=True)
    assert storage.cache_path(root, "sub/model_index.json") == (root / "sub" / "model_index.json").resolve()
    (root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(storage.UnsafeKeyError, match="outside the cache"):
        storage.cache_path(root, "link/x.bin")


def test_materialize_refuses_a_dotdot_key_and_writes_nothing(s3_bucket: str, tmp_path: Path) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket=s3_bucket, Key="model/ok.json", Body=b"{}")
    s3.put_object(Bucket=s3_bucket, Key="model/../../../escaped.txt", Body=b"pwned")
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(storage.UnsafeKeyError, match=r"\.\./\.\./\.\./escaped\.txt"):
        storage.materialize(f"s3://{s3_bucket}/model", cache_dir=cache)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not list(tmp_path.rglob("ok.json"))  # every key is checked before anything is written


def test_materialize_revalidates_by_etag_not_size(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Downloads are counted (not inferred from mtimes, which a coarse-mtime file system would hide),
    # and the local edit below gets an explicit later mtime (os.utime, ns), as a later write has.
    fetched: list[str] = []
    real_fetch = storage._fetch

    def counting_fetch(fs, remote, dest, etag):
        fetched.append(remote)
        return real_fetch(fs, remote, dest, etag)

    monkeypatch.setattr(storage, "_fetch", counting_fetch)
    uri = f"s3://{s3_bucket}/model"
    storage.write_bytes(f"{uri}/w.bin", b"a" * 100)
    cache = tmp_path / "cache"
    local = storage.materialize(uri, cache_dir=cache)
    assert (local / "w.bin").read_bytes() == b"a" * 100 and len(fetched) == 1
    assert storage.materialize(uri, cache_dir=cache) == local
    assert len(fetched) == 1  # unchanged object: not downloaded again

    storage.write_bytes(f"{uri}/w.bin", b"b" * 100)  # same size, new content (new ETag)
    assert (storage.materialize(uri, cache_dir=cache) / "w.bin").read_bytes() == b"b" * 100
    assert len(fetched) == 2

    mtime = (local / "w.bin").stat().st_mtime_ns
    (local / "w.bin").write_bytes(b"c" * 100)  # the cached copy was changed locally, same size
    os.utime(local / "w.bin", ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))
    assert (storage.materialize(uri, cache_dir=cache) / "w.bin").read_bytes() == b"b" * 100
    assert len(fetched) == 3

    one = storage.materialize(f"{uri}/w.bin", cache_dir=cache)  # a single object, too
    storage.write_bytes(f"{uri}/w.bin", b"d" * 100)
    assert storage.materialize(f"{uri}/w.bin", cache_dir=cache) == one and one.read_bytes() == b"d" * 100


# --------------------------------------------------------------------------------------------
# tar shards: malformed headers end the shard, long captions and big shards are counted


def _shard(tmp_path: Path, n: int = 4, name: str = "s.tar") -> bytes:
    return prompt_shard_bytes([(f"k{i:03d}", f"a red circle number {i}", {"i": i}) for i in range(n)])


def _header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header with an arbitrary 12-byte size field and a correct checksum."""
    hdr = bytearray(BLOCK)
    hdr[: len(name)] = name
    hdr[100:108] = b"0000644\0"
    hdr[124:136] = size_field.ljust(12, b"\0")[:12]
    hdr[136:148] = b"00000000000\0"
    hdr[148:156] = b" " * 8
    hdr[156:157] = kind
    hdr[257:265] = b"ustar\x0000"
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


def _member(name: bytes, data: bytes, kind: bytes = b"0") -> bytes:
    return _header(name, b"%011o\0" % len(data), kind) + data + bytes(-len(data) % BLOCK)


@pytest.mark.timeout(20)
def test_negative_size_field_marks_the_shard_corrupt(tmp_path: Path) -> None:
    good = _shard(tmp_path, 2)[: -2 * BLOCK]  # without the end-of-archive blocks
    crafted = good + _header(b"evil.txt", b"-0000001000") + bytes(BLOCK) + bytes(2 * BLOCK)
    t0 = time.perf_counter()
    parsed = parse_prompt_tar(crafted)
    assert time.perf_counter() - t0 < 1.0
    # samples before the damage are kept (the one being read when it hit is dropped)
    assert parsed.captions == ["a red circle number 0"]
    assert parsed.bad["corrupt_shard"] == 1 and "negative" in parsed.error


@pytest.mark.timeout(20)
@pytest.mark.parametrize("pax", [b"0 mtime=1\n", b"0 path=k000.txt\n", b"\n", b"x path=a\n", b"99 path=a\n", b"3 \n", b"12 path=abc"])
def test_bad_pax_record_length_marks_the_shard_corrupt(tmp_path: Path, pax: bytes) -> None:
    good = _shard(tmp_path, 2)[: -2 * BLOCK]
    crafted = good + _member(b"PaxHeader/k009", pax, b"x") + _member(b"k009.txt", b"caption") + bytes(2 * BLOCK)
    t0 = time.perf_counter()
    parsed = parse_prompt_tar(crafted)
    assert time.perf_counter() - t0 < 1.0
    assert parsed.captions == ["a red circle number 0"]
    assert parsed.bad["corrupt_shard"] == 1 and "PAX" in parsed.error


def test_valid_pax_path_is_still_read(tmp_path: Path) -> None:
    record = b"path=long/k777.txt\n"
    length = len(record) + 3  # "<len> " has 2 digits + 1 space
    pax = b"%d %s" % (length, record)
    assert len(pax) == length
    crafted = _member(b"PaxHeader/x", pax, b"x") + _member(b"short.txt", b"from pax") + bytes(2 * BLOCK)
    assert parse_prompt_tar(crafted).captions == ["from pax"]


def test_long_caption_is_counted_not_kept(tmp_path: Path) -> None:
    import tracemalloc

    big = b"x" * (50 << 20)
    crafted = _member(b"k0.txt", b"short one") + _member(b"k1.txt", big) + bytes(2 * BLOCK)
    del big
    # The 50 MB member is never copied: the parse allocates a few KB, not a 50 MB slice of the shard
    # (a first parse imports what the parser imports lazily, numpy: that would count otherwise).
    parse_prompt_tar(_member(b"w.txt", b"warm-up") + bytes(2 * BLOCK))
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        parsed = parse_prompt_tar(crafted)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        if not tracing:
            tracemalloc.stop()
    assert parsed.captions == ["short one"] and parsed.bad["too_long"] == 1 and not parsed.error
    assert peak < 1 << 20, f"parsing allocated {peak:,} bytes at its peak"
    # the cap is the recipe key data.max_caption_bytes
    assert parse_prompt_tar(crafted, max_caption_bytes=4).bad["too_long"] == 2
    from pipelines.config.job import load_config

    assert load_config("embedded").data.max_caption_bytes == 16 * 1024
    with pytest.raises(ConfigError, match="max_caption_bytes"):
        load_config("embedded", {"data.max_caption_bytes": 0})


def test_too_long_reaches_the_bad_rows_and_metrics_names() -> None:
    import pyarrow as pa

    from pipelines.data.prompts import parse_shard_batch

    crafted = _member(b"k0.txt", b"ok") + _member(b"k1.txt", b"y" * 100) + bytes(2 * BLOCK)
    table = parse_shard_batch(pa.table({"bytes": pa.array([crafted], pa.binary())}), max_caption_bytes=50)
    assert table.column("bad").to_pylist() == [0, bad_code("too_long")]
    assert "too_long" in BAD_REASONS  # -> data/bad_too_long


def test_shard_size_cap(tmp_path: Path) -> None:
    data = _shard(tmp_path, 8)
    parsed = parse_prompt_tar(data, max_shard_bytes=len(data) - 1)
    assert parsed.captions == [] and parsed.bad["corrupt_shard"] == 1 and "max_shard_bytes" in parsed.error
    from pipelines.data.prompts import list_shards

    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "a.tar").write_bytes(_shard(tmp_path, 2))
    (lake / "b.tar").write_bytes(data)
    with pytest.warns(UserWarning, match="over data.max_shard_bytes"):
        _, paths = list_shards(str(lake), max_shard_bytes=len(data) - 1)
    assert [Path(p).name for p in paths] == ["a.tar"]


def _mutate(rng: random.Random, base: bytes) -> bytes:
    """One random mutation of a valid shard, aimed at headers (their checksums often fixed up)."""
    buf = bytearray(base)
    headers = list(range(0, len(base) - 2 * BLOCK, BLOCK))
    headers = [h for h in headers if base[h + 257 : h + 262] == b"ustar"]
    h = rng.choice(headers)
    op = rng.randrange(8)
    if op == 0:  # size field: negative, huge, garbage, base-256
        buf[h + 124 : h + 136] = rng.choice([b"-0000001000\0", b"77777777777\0", b"zzzzzzzzzzz\0",
                                             b"\x80" + bytes(10) + b"\x01", b"\xff" * 12, b" -1\0" + bytes(8),
                                             b"%011o\0" % rng.randrange(0, 1 << 33)])
    elif op == 1:  # type flag: PAX, GNU long name, others
        buf[h + 156] = rng.choice(b"xLgK57\0")
    elif op == 2:  # a PAX payload with a random length field
        pax = b"%d %s\n" % (rng.choice([0, 1, 2, 3, 5, 10, 14, 15, 99, 10**9]), rng.choice([b"mtime=1", b"path=k.txt"]))
        member = _member(b"PaxHeader/p", pax, b"x")
        buf[h:h] = member
    elif op == 3:  # truncate anywhere
        del buf[rng.randrange(len(buf)):]
    elif op == 4:  # random bytes over a header
        for _ in range(rng.randint(1, 16)):
            buf[h + rng.randrange(BLOCK)] = rng.randrange(256)
    elif op == 5:  # duplicate or delete a block
        b = rng.randrange(len(buf) // BLOCK) * BLOCK
        if rng.random() < 0.5:
            buf[b:b] = buf[b : b + BLOCK]
        else:
            del buf[b : b + BLOCK]
    elif op == 6:  # checksum field garbage
        buf[h + 148 : h + 156] = rng.choice([b"-0000001", b"zzzzzz\0 ", b"\0" * 8, b"7777777\0"])
    else:  # name: no dot, all dots, no NUL
        buf[h : h + 100] = rng.choice([b"a" * 100, b"." * 100, b"k.txt".ljust(100, b"\0")])
    if rng.random() < 0.7 and op not in (3, 6) and h + BLOCK <= len(buf):  # fix the checksum up
        buf[h + 148 : h + 156] = b" " * 8
        buf[h + 148 : h + 156] = b"%06o\0 " % sum(buf[h : h + BLOCK])
    return bytes(buf)


@pytest.mark.timeout(120)
def test_fuzz_mutated_shards_end_fast_and_only_count(tmp_path: Path) -> None:
    base = _shard(tmp_path, 6)
    rng = random.Random(14)
    worst, total = 0.0, time.perf_counter()
    reasons = set()
    for i in range(1000):
        data = _mutate(rng, base)
        t0 = time.perf_counter()
        parsed = parse_prompt_tar(data)  # must never raise
        dt = time.perf_counter() - t0
        worst = max(worst, dt)
        assert dt < 1.0, f"mutation {i} took {dt:.2f} s"
        assert set(parsed.bad) == set(BAD_REASONS) and all(v >= 0 for v in parsed.bad.values())
        assert all(isinstance(c, str) and c for c in parsed.captions)
        assert len(parsed.captions) + sum(parsed.bad.values()) <= 6 + 1 + len(data) // BLOCK
        reasons.update(r for r, v in parsed.bad.items() if v)
    total = time.perf_counter() - total
    print(f"fuzz: 1000 parses in {total:.2f} s, slowest {worst * 1e3:.1f} ms, reasons seen {sorted(reasons)}")
    assert "corrupt_shard" in reasons
    assert total < 30


# --------------------------------------------------------------------------------------------
# redaction of URI user info


@pytest.mark.parametrize("text, expected", [
    ("http://user:pw@host:5000", "http://***@host:5000"),
    (f"s3://AKIAXYZ:{SECRET}@bucket/teacher", "s3://***@bucket/teacher"),
    ("http://u:p@ss@mlflow/x", "http://***@mlflow/x"),
    ("teacher s3://A:B@b/k and http://u:v@h/ done", "teacher s3://***@b/k and http://***@h/ done"),
    ("s3://bucket/images/a@2x.png", "s3://bucket/images/a@2x.png"),
    ("http://host:5000/path@x", "http://host:5000/path@x"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
])
def test_redact(text: str, expected: str) -> None:
    from wadi_core.redact import redact

    assert redact(text) == expected
    assert redact({"k": [text]}) == {"k": [expected]}


def _secret_overrides() -> dict[str, str]:
    return {"train.storage_path": f"s3://AKIAXYZ:{SECRET}@bucket/runs",
            "data.prompts": f"s3://AKIAXYZ:{SECRET}@bucket/lake", "data.num_prompts": 1000,
            "tracking.uri": f"http://admin:{SECRET}@127.0.0.1:1"}


@pytest.mark.parametrize("as_json", [False, True])
def test_dry_run_prints_no_secret(capsys: pytest.CaptureFixture, as_json: bool) -> None:
    from jobs.distill import main

    argv = ["--dry-run", *(f"{k}={v}" for k, v in _secret_overrides().items())] + (["--json"] if as_json else [])
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "***@bucket/runs" in out.out
    assert SECRET not in out.out + out.err and "AKIAXYZ" not in out.out + out.err


def test_config_error_prints_no_secret(capsys: pytest.CaptureFixture) -> None:
    from jobs.distill import main

    assert main([f"data.prompts=[s3://AKIAXYZ:{SECRET}@bucket/lake]"]) == 2  # not a string
    err = capsys.readouterr().err
    assert "data.prompts: expected a string" in err and "s3://***@bucket/lake" in err
    assert SECRET not in err and "AKIAXYZ" not in err


def test_mlflow_sqlite_run_holds_no_secret(tmp_path: Path) -> None:
    import mlflow

    from pipelines.config.job import load_config
    from pipelines.tracking.client import start_run

    cfg = load_config("embedded", {**_secret_overrides(), "teacher": f"s3://AKIAXYZ:{SECRET}@bucket/teacher"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tags = {"wadi.teacher": cfg.teacher, "wadi.prompts": cfg.data.prompts}  # as pipelines.run sets them
    with start_run("exp", run_name="r", tracking_uri=uri, params={**cfg.to_flat()}, tags=tags) as run:
        run.log_params({"extra.uri": f"http://u:{SECRET}@h/"})
        run.set_tags({"extra": f"s3://k:{SECRET}@b/p"})
        run_id = run.run_id
    data = mlflow.MlflowClient(uri).get_run(run_id).data
    stored = json.dumps({"params": data.params, "tags": data.tags})
    assert data.params["train.storage_path"] == "s3://***@bucket/runs"
    assert data.tags["wadi.teacher"] == "s3://***@bucket/teacher"
    assert SECRET not in stored and "AKIAXYZ" not in stored


def _no_secret(text: str) -> bool:
    """Neither the secret nor a piece of it (a "/" in it would end a naive URI parse there)."""
    return not any(part in text for part in (SECRET, *SECRET.split("/"), "AKIAXYZ"))


def test_unreachable_tracking_server_warning_holds_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first "unreachable" warning (the /health probe finds nothing listening): the URI in it
    is redacted, and a password with a "/" neither crashes the probe nor leaks through its reason."""
    from pipelines.tracking.client import start_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = _free_port()
    with pytest.warns(UserWarning, match=r"unreachable") as caught:
        with start_run("exp", tracking_uri=f"http://AKIAXYZ:{SECRET}@127.0.0.1:{port}") as run:
            run.log_metrics({"loss": 1.0}, step=0)  # a no-op, not a crash
            assert not run.active
    messages = [str(w.message) for w in caught]
    assert any(f"MLflow tracking at http://***@127.0.0.1:{port} is unreachable" in m for m in messages), messages
    assert all(_no_secret(m) for m in messages), messages


def test_tracking_server_that_fails_after_the_probe_warns_without_secret(fake_mlflow: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The second "unreachable" warning: the server answers the probe but MLflow's own calls fail
    (here: it refuses the credentials). Credentials in the URI do not make the probe fail."""
    from pipelines.tracking.client import start_run, unreachable_reason

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = f"http://AKIAXYZ:{SECRET}@127.0.0.1:{fake_mlflow}"
    assert unreachable_reason(uri) is None  # it answers /health (401 here): reachable
    assert unreachable_reason(f"http://admin:right@127.0.0.1:{fake_mlflow}") is None
    with pytest.warns(UserWarning, match=r"unreachable") as caught:
        with start_run("exp", tracking_uri=uri) as run:
            assert not run.active
    messages = [str(w.message) for w in caught]
    assert any(f"MLflow tracking at http://***@127.0.0.1:{fake_mlflow} is unreachable (" in m for m in messages), messages
    assert all(_no_secret(m) for m in messages), messages


def test_log_records_are_redacted_once_installed() -> None:
    """``install_log_redaction`` puts a filter on the handlers of the root, "ray" and "mlflow"
    loggers: a URI with user info is redacted in what they print, whoever logged it."""
    import io
    import logging

    from pipelines.tracking.client import install_log_redaction

    uri = f"s3://AKIAXYZ:{SECRET}@bucket/runs"
    streams = {name: io.StringIO() for name in ("", "ray", "mlflow")}
    handlers = {name: logging.StreamHandler(s) for name, s in streams.items()}
    root_before = list(logging.getLogger().handlers)
    for name, handler in handlers.items():
        logging.getLogger(name).addHandler(handler)
    try:
        install_log_redaction()
        install_log_redaction()  # idempotent: one filter per handler
        assert all(len(h.filters) == 1 for h in handlers.values())
        logging.getLogger("wadi.test").warning("uploading to %s", uri)
        logging.getLogger("ray.train").warning("checkpoint at %s", uri)
        logging.getLogger("mlflow.store").warning(f"artifacts at {uri}")
    finally:
        for name, handler in handlers.items():
            logging.getLogger(name).removeHandler(handler)
        for handler in set(logging.getLogger().handlers) - set(root_before):
            logging.getLogger().removeHandler(handler)
    printed = {name: s.getvalue() for name, s in streams.items()}
    assert "uploading to s3://***@bucket/runs" in printed[""]
    assert "checkpoint at s3://***@bucket/runs" in printed["ray"] and "artifacts at s3://***@bucket/runs" in printed["mlflow"]
    assert all(_no_secret(text) for text in printed.values()), printed


@pytest.mark.parametrize("as_json", [False, True])
def test_job_result_prints_no_secret(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                     as_json: bool) -> None:
    """The result jobs/distill.py prints (summary or --json) of a run whose URIs hold user info."""
    import jobs.distill
    import pipelines.run
    from jobs.distill import main

    runs = f"s3://AKIAXYZ:{SECRET}@bucket/runs/r"
    result = pipelines.run.DistillResult(
        run_name="r", tracking_uri=f"http://admin:{SECRET}@mlflow:5000", mlflow_run_id="abc",
        export_uri=f"{runs}/export", checkpoint=f"{runs}/checkpoint_00000008", metrics={"step": 8},
        model={"name": "wadi", "alias": "latest", "version": 1, "source": f"{runs}/export"})
    monkeypatch.setattr(jobs.distill, "run_distillation", lambda cfg, ray_address=None: result)  # as the job calls it
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # main sets these defaults
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    assert main([*(f"{k}={v}" for k, v in _secret_overrides().items()), *(["--json"] if as_json else [])]) == 0
    out = capsys.readouterr()
    assert "s3://***@bucket/runs/r/export" in out.out and "http://***@mlflow:5000" in out.out
    assert _no_secret(out.out + out.err), out.out + out.err


# --------------------------------------------------------------------------------------------
# config: YAML errors, ranges, kind=full with a rank


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from jobs.distill import main
    from pipelines.config.job import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: embedded\nvsd:\n  t_max: [1, 2\n  t_min: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml, line \d+, column \d+: YAML syntax error"):
        load_config(str(bad))
    assert main(["--config", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and "bad.yaml, line" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("embedded", ["vsd.t_max=[1"])


@pytest.mark.parametrize("overrides, match", [
    ({"train.log_every": 0}, r"train.log_every must be >= 1"),
    ({"vsd.t_max": 5000}, r"vsd.t_max=5000 .* must be < the teacher's num_train_timesteps \(1000\)"),
    ({"vsd.t_min": 900, "vsd.t_max": 800}, r"t_min <= t_max"),
    ({"vsd.student_timestep": 1000}, r"num_train_timesteps"),
    ({"vsd.gen_lr": -1e-4}, r"gen_lr must be a positive"),
    ({"vsd.fake_lr": 0}, r"fake_lr must be a positive"),
    ({"vsd.gen_lr": float("nan")}, r"vsd.gen_lr: expected a number, got NaN"),
    ({"vsd.student.kind": "full"}, r"vsd.student: kind=full .* drop the rank \(rank=0\)"),
    ({"vsd.fake.kind": "full", "vsd.fake.rank": 8}, r"vsd.fake: kind=full .* drop the rank"),
    ({"vsd.student.rank": -3}, r"vsd.student: a lorad adapter needs rank >= 1, got -3"),
    ({"train.max_failures": -1}, r"max_failures"),
])
def test_out_of_range_values_are_config_errors(overrides: dict, match: str) -> None:
    from pipelines.config.job import load_config

    with pytest.raises(ConfigError, match=match):
        load_config("embedded", overrides)


def test_full_without_rank_is_fine() -> None:
    from pipelines.config.job import load_config

    cfg = load_config("embedded", {"vsd.student.kind": "full", "vsd.student.rank": 0})
    assert cfg.vsd.student.kind == "full"
    # ... and what the config accepted, the worker builds (the same rule in add_adapter)
    from dataclasses import replace

    from torch import nn

    from wadi_core.adapters import adapter_info, apply_adapter

    model = nn.Sequential(nn.Linear(4, 4))
    apply_adapter(model, replace(cfg.vsd.student, targets="re:0"), "student", "sd")
    assert adapter_info(model, "student")["kind"] == "full" and adapter_info(model, "student")["rank"] == 0


# --------------------------------------------------------------------------------------------
# preflight: teacher, tracking server, CPUs (before Ray starts)


def _cfg(**overrides):  # noqa: ANN202
    from pipelines.config.job import load_config

    return load_config("embedded", overrides)


def test_teacher_local_checks(tmp_path: Path) -> None:
    from pipelines.runtime.preflight import check_teacher

    check_teacher(_cfg())  # embedded
    with pytest.raises(ConfigError, match="does not exist"):
        check_teacher(_cfg(teacher=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no model_index.json"):
        check_teacher(_cfg(teacher=str(tmp_path / "empty")))
    t = tmp_path / "t"
    (t / "scheduler").mkdir(parents=True)
    (t / "model_index.json").write_text("{}")
    check_teacher(_cfg(teacher=str(t)))
    (t / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 500}')
    with pytest.raises(ConfigError, match=r"num_train_timesteps \(500"):
        check_teacher(_cfg(teacher=str(t)))
    (t / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        check_teacher(_cfg(teacher=str(t)))


def test_teacher_s3_checks(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.runtime.preflight import check_teacher

    with pytest.raises(ConfigError, match="does not exist"):
        check_teacher(_cfg(teacher=f"s3://{s3_bucket}/teacher"))
    storage.write_bytes(f"s3://{s3_bucket}/teacher/model_index.json", b"{}")
    check_teacher(_cfg(teacher=f"s3://{s3_bucket}/teacher"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="did not answer"):
        check_teacher(_cfg(teacher=f"s3://{s3_bucket}/teacher"), timeout=2)
    assert time.perf_counter() - t0 < 15


class _FakeMlflow(http.server.BaseHTTPRequestHandler):
    """Answers like an MLflow server with basic auth: 401 without the right credentials, else
    404 RESOURCE_DOES_NOT_EXIST for the experiment lookup."""

    expected = "Basic " + base64.b64encode(b"admin:right").decode()

    def do_GET(self) -> None:  # noqa: N802
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.end_headers()
            return
        body = b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}'
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture
def fake_mlflow():  # noqa: ANN201
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_tracking_server_checks(fake_mlflow: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.runtime.preflight import check_tracking_server

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_tracking_server(_cfg())  # embedded default: local sqlite, not checked
    closed = f"http://admin:{SECRET}@127.0.0.1:{_free_port()}"
    with pytest.raises(ConfigError, match="cannot be reached") as e:
        check_tracking_server(_cfg(**{"tracking.uri": closed}), timeout=2)
    assert "cannot be reached" in str(e.value) and "tracking.require_server=false" in str(e.value)
    assert SECRET not in str(e.value)
    with pytest.warns(UserWarning, match="runs untracked"):
        check_tracking_server(_cfg(**{"tracking.uri": closed, "tracking.require_server": False}), timeout=2)

    wrong = f"http://admin:wrong@127.0.0.1:{fake_mlflow}"
    with pytest.raises(ConfigError, match="refuses the credentials"):
        check_tracking_server(_cfg(**{"tracking.uri": wrong}))
    check_tracking_server(_cfg(**{"tracking.uri": f"http://admin:right@127.0.0.1:{fake_mlflow}"}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{fake_mlflow}")  # env, credentials in env
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI\): it refuses"):
        check_tracking_server(_cfg())
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "right")
    check_tracking_server(_cfg())


def test_cpu_headroom() -> None:
    from pipelines.runtime.preflight import check_cpu_headroom

    check_cpu_headroom(_cfg(), 2)  # 2 x 0.5 leaves 1 CPU
    with pytest.raises(ConfigError, match=r"leaves Ray Data less than 1 CPU .* lower train.cpus_per_worker"):
        check_cpu_headroom(_cfg(**{"train.cpus_per_worker": 0.75}), 2)
    with pytest.warns(UserWarning, match="autoscaling"):
        check_cpu_headroom(_cfg(**{"train.cpus_per_worker": 1}), 2, strict=False)


@pytest.mark.parametrize("overrides, match", [
    ({"train.cpus_per_worker": 1}, "less than 1 CPU"),
    ({"tracking.uri": "http://127.0.0.1:{port}"}, "require_server=false"),
    ({"teacher": "/nonexistent/teacher"}, "does not exist"),
])
def test_job_fails_before_ray_starts(overrides: dict, match: str, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ray

    import pipelines.run
    from jobs.distill import main

    monkeypatch.setattr(pipelines.run, "local_cpus", lambda: 2)
    monkeypatch.setenv("WADI_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = _free_port()
    argv = [f"{k}={str(v).format(port=port)}" for k, v in overrides.items()]
    assert not ray.is_initialized()
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not ray.is_initialized()


# --------------------------------------------------------------------------------------------
# Ray: no address -> a private local Ray, whatever the current-cluster file says


def test_ray_address_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.runtime.cluster import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address() == "local"
    assert ray_address("10.0.0.1:6379") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert ray_address() == "ray://head:10001" and ray_address("x:1") == "x:1"


@pytest.fixture
def ray_tmpdir(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A private RAY_TMPDIR (short: Ray's socket paths have a length limit), so the
    current-cluster file and any head started here never touch other users' /tmp/ray."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="wr")
    monkeypatch.setenv("RAY_TMPDIR", d)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_stale_current_cluster_file_is_ignored(ray_tmpdir: Path) -> None:
    import ray

    from pipelines.runtime.cluster import init_ray

    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")  # nobody there
    assert init_ray(num_cpus=1, include_dashboard=False, log_to_driver=False) is True
    try:
        assert ray.cluster_resources()["CPU"] == 1
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_local_ray_is_started_while_a_head_runs(ray_tmpdir: Path) -> None:
    """With a ``ray start --head`` on this machine (its address in the current-cluster file),
    the ray fixture's and the jobs' init starts a private Ray instead of joining it. The head
    is stopped by terminating the ``ray start --block`` process started here (never ``ray stop``,
    which would stop every Ray of this user)."""
    import subprocess

    import psutil
    import ray

    from pipelines.runtime.cluster import init_ray

    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=3", "--include-dashboard=false",
         "--disable-usage-stats", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ),
    )
    address_file = ray_tmpdir / "ray" / "ray_current_cluster"
    try:
        deadline = time.time() + 120
        while not address_file.exists() and time.time() < deadline:
            assert head.poll() is None, "ray start --head exited"
            time.sleep(0.5)
        assert address_file.exists(), "ray start --head did not write its address"
        assert init_ray(num_cpus=2, include_dashboard=False, log_to_driver=False) is True
        try:
            assert ray.cluster_resources()["CPU"] == 2  # not the head's 3
            assert not ray.get_runtime_context().gcs_address.endswith(f":{port}")
            assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
        finally:
            ray.shutdown()
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        # anything of that head still alive lives under this private RAY_TMPDIR
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if str(ray_tmpdir) in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
