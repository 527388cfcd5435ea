"""wadi_core.storage (local + S3 over moto), wadi_core.config, pipelines.tracking.client."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Literal

import pytest

from wadi_core import storage
from wadi_core.config import ConfigError, from_dict, replace_flat, to_flat_dict


@dataclasses.dataclass(frozen=True)
class Inner:
    rank: int = 4
    kind: Literal["lorad", "lora"] = "lorad"
    layers: tuple[str, ...] = ("a", "b")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    lr: float = 1e-4
    inner: Inner = Inner()
    path: str | None = None


def test_config_flat_round_trip():
    cfg = Outer(inner=Inner(rank=8, kind="lora"))
    flat = to_flat_dict(cfg)
    assert flat["inner.rank"] == 8 and flat["inner.layers"] == ["a", "b"]
    assert from_dict(Outer, flat) == cfg
    assert replace_flat(cfg, {"inner.rank": "16", "lr": "0.5"}) == Outer(lr=0.5, inner=Inner(rank=16, kind="lora"))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"inner.rnak": 3}, "unknown config key"),
        ({"inner.kind": "dora"}, "not one of"),
        ({"inner.rank": "many"}, "expected an integer"),
        ({"inner.rank": 2.5}, "expected an integer"),
    ],
)
def test_config_errors_say_what_is_wrong(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Outer, bad)


def test_storage_local(tmp_path):
    storage.write_bytes(tmp_path / "a" / "b.txt", b"hi")
    assert storage.read_bytes(tmp_path / "a" / "b.txt") == b"hi"
    assert storage.materialize(tmp_path / "a") == tmp_path / "a"
    assert [p.endswith("b.txt") for p in storage.list_files(tmp_path, ".txt")] == [True]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.materialize(tmp_path / "missing")


def test_storage_s3_round_trip(s3_bucket, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "x.bin").write_bytes(b"\x00" * 100)
    (src / "sub" / "y.json").write_text("{}")
    uri = f"s3://{s3_bucket}/model"
    storage.upload_dir(src, uri)
    assert storage.list_files(uri) == [f"{uri}/sub/y.json", f"{uri}/x.bin"]
    local = storage.materialize(uri, cache_dir=tmp_path / "cache")
    assert (local / "x.bin").read_bytes() == b"\x00" * 100
    assert (local / "sub" / "y.json").read_text() == "{}"
    with pytest.raises(FileNotFoundError, match="nothing found"):
        storage.materialize(f"s3://{s3_bucket}/nope", cache_dir=tmp_path / "cache")


def test_tracking_filters_secrets_and_survives_unreachable_server(tmp_path):
    from pipelines.tracking import client as tracking

    params = tracking.safe_params({"aws_secret_access_key": "s", "data.uri": "s3://b/p", "api_token": "t"})
    assert params == {"data.uri": "s3://b/p"}
    assert tracking.redact_uri("http://user:pw@host:5000") == "http://***@host:5000"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracking.start_run("exp", tracking_uri="http://user:hunter2@127.0.0.1:9", params={"a": 1}) as run:
            run.log_metrics({"loss": 1.0}, step=0)  # must be a no-op, not a crash
            assert not run.active
    messages = [str(w.message) for w in caught]
    assert any("MLflow tracking at http://***@127.0.0.1:9 is unreachable" in m for m in messages), messages
    assert not any("hunter2" in m for m in messages), messages


def test_tracking_sqlite_logs(tmp_path):
    import mlflow

    from pipelines.tracking import client as tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking.start_run("exp", tracking_uri=uri, params={"vsd.lr": 0.1, "password": "x"}) as run:
        run.log_metrics({"loss": 2.0}, step=1)
        run_id = run.run_id
    data = mlflow.MlflowClient(uri).get_run(run_id).data
    assert data.params == {"vsd.lr": "0.1"} and data.metrics["loss"] == 2.0
    # start_run sets MLflow's process-wide URI (and so MLFLOW_TRACKING_URI): the next test checks
    # that tests/conftest.py put both back.
    assert mlflow.get_tracking_uri() == uri and os.environ.get("MLFLOW_TRACKING_URI") == uri
    _SET_BY_A_TEST["uri"] = uri


_SET_BY_A_TEST: dict[str, str] = {}


def test_tracking_uri_set_by_the_test_before_is_restored():
    import mlflow

    if not _SET_BY_A_TEST:
        pytest.skip("runs after test_tracking_sqlite_logs (same process)")
    leaked = _SET_BY_A_TEST.pop("uri")
    assert os.environ.get("MLFLOW_TRACKING_URI") != leaked and mlflow.get_tracking_uri() != leaked


def test_sample_grid_upscales_only_small_tiles(tmp_path):
    """Grids stay readable without blowing up large images: 32 px tiles x4, 64 px x2, 512 px x1."""
    import torch
    from PIL import Image

    from wadi_core.images import grid_scale, save_image_grid

    assert [grid_scale(s) for s in (16, 32, 64, 100, 128, 256, 512)] == [8, 4, 2, 1, 1, 1, 1]
    for size, expected in ((32, 128), (512, 512)):
        path = save_image_grid([torch.rand(2, 3, size, size)], tmp_path / f"g{size}.png")
        with Image.open(path) as img:
            assert img.size == (2 * expected, expected)
    with Image.open(save_image_grid([torch.rand(1, 3, 32, 32)], tmp_path / "x.png", scale=1)) as img:
        assert img.size == (32, 32)
