"""Prompt sources, the seeded sampler, and generation on Ray Data actors (1 vs 2 workers)."""

from __future__ import annotations

import importlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.evaluate.config import ModelSpec
from pipelines.evaluate.generation import ImageGenerator, PromptRecord, load_prompts, prompt_seed

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> str:
    from wadi_core.models.tiny import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe", "sd", seed=0))


def _load_job(name: str):
    return importlib.import_module(f"jobs.{name}")


def test_prompt_seed_is_stable_and_key_dependent():
    assert prompt_seed(0, "a") == prompt_seed(0, "a")
    assert len({prompt_seed(0, "a"), prompt_seed(1, "a"), prompt_seed(0, "b")}) == 3
    assert 0 <= prompt_seed(123, "coco-42") < 2**63


def test_prompt_sources(tmp_path):
    (tmp_path / "list.txt").write_text("a cat\na dog\n")
    recs, info = load_prompts(str(tmp_path / "list.txt"))
    assert [r.prompt for r in recs] == ["a cat", "a dog"] and len(info["sha256"]) == 64
    (tmp_path / "arr.json").write_text(json.dumps(["x", "y", "z"]))
    assert [r.prompt for r in load_prompts(str(tmp_path / "arr.json"), num=2)[0]] == ["x", "y"]
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(5)],
            "annotations": [{"image_id": i, "id": 10 * i + j, "caption": f"img{i} cap{j}"}
                            for i in range(5) for j in range(3)]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(coco))
    recs, info = load_prompts(str(tmp_path / "captions_val2017.json"), draw_seed=7)
    assert len(recs) == 5 and all(r.prompt.startswith(f"img{r.key.split('-')[1]} ") for r in recs)
    hps = tmp_path / "benchmark"
    hps.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (hps / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(4)]))
    recs, _ = load_prompts(f"hpsv2:{hps}", num=3)
    assert len(recs) == 12 and {r.group for r in recs} == {"anime", "concept-art", "paintings", "photo"}
    assert recs[0] == PromptRecord(0, "hpsv2-anime-000000", "anime 0", "anime")
    with pytest.raises(ValueError, match="unknown prompt source"):
        load_prompts("nothing")


def test_coco30k_list_is_the_canonical_one(monkeypatch):
    from pathlib import Path

    from wadi_core.metrics.coco import COCO30K_SHA256, default_coco30k_path

    monkeypatch.delenv("WADI_COCO30K", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert default_coco30k_path() == repo / "data" / "prompts" / "coco2014_val_30k_captions.txt"
    recs, info = load_prompts("coco30k")
    assert len(recs) == 30000 and info["num_prompts"] == 30000
    assert len({r.prompt for r in recs}) == 29436  # distinct captions of the canonical list
    assert info["sha256"] == COCO30K_SHA256


def test_generator_is_batch_independent_and_cfg_matters(tiny_pipeline):
    gen = ImageGenerator(ModelSpec(uri=tiny_pipeline, steps=2, guidance=3.0), seed=0)
    prompts, keys = ["a red circle", "a blue square", "a green cross"], ["k0", "k1", "k2"]
    batch = gen.generate(prompts, keys)
    assert batch.shape == (3, 32, 32, 3) and batch.dtype == np.uint8
    singles = np.concatenate([gen.generate([p], [k]) for p, k in zip(prompts, keys)])
    # the noise is per key: batching changes only float rounding in batched matmuls (CPUs whose GEMM
    # blocks by batch size: at most one grey level, in a few pixels); a mixed-up key changes every image
    diff = np.abs(batch.astype(int) - singles.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    no_cfg = ImageGenerator(ModelSpec(uri=tiny_pipeline, steps=2, guidance=1.0), seed=0).generate(prompts, keys)
    assert not np.array_equal(batch, no_cfg)
    other_seed = ImageGenerator(ModelSpec(uri=tiny_pipeline, steps=2, guidance=3.0), seed=1).generate(prompts, keys)
    assert not np.array_equal(batch, other_seed)


def test_generator_applies_a_student_adapter(tiny_pipeline, tmp_path):
    from wadi_core.adapters import add_adapter, adapter_parameters, save_adapter
    from wadi_core.models import load_teacher

    teacher = load_teacher(tiny_pipeline)
    add_adapter(teacher.denoiser, "lorad", "student", 4, "unet_student")
    save_adapter(teacher.denoiser, "student", tmp_path / "identity_student.safetensors")
    with torch.no_grad():
        for p in adapter_parameters(teacher.denoiser, "student"):
            p.normal_(0, 0.3)
    save_adapter(teacher.denoiser, "student", tmp_path / "moved_student.safetensors")
    keys, prompts = ["a", "b"], ["a red circle", "a blue square"]
    base = ImageGenerator(ModelSpec(uri=tiny_pipeline), seed=0).generate(prompts, keys)
    same = ImageGenerator(ModelSpec(uri=tiny_pipeline, adapter=str(tmp_path / "identity_student.safetensors")),
                          seed=0).generate(prompts, keys)
    moved = ImageGenerator(ModelSpec(uri=tiny_pipeline, adapter=str(tmp_path / "moved_student.safetensors")),
                           seed=0).generate(prompts, keys)
    assert np.abs(base.astype(int) - same).max() <= 1  # LoRaD is the identity at init
    assert not np.array_equal(base, moved)


def test_model_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        ModelSpec(steps=0)
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec(dtype="float8")


# ------------------------------------------------------------------------------ Ray (slow)
@pytest.mark.ray
@pytest.mark.slow
def test_images_do_not_depend_on_worker_count(s3_bucket, ray_local, tiny_pipeline, tmp_path):
    from pipelines.evaluate.generation import generation_dataset

    recs = [PromptRecord(i, f"p-{i:06d}", f"a prompt number {i % 3}") for i in range(10)]
    spec = ModelSpec(uri=tiny_pipeline, steps=2, guidance=2.0)
    ds = generation_dataset(recs, spec, seed=5, concurrency=1, batch_size=4, cpus_per_actor=0.5, num_blocks=2)
    rows = sorted(ds.take_all(), key=lambda r: r["key"])
    one_worker = np.stack([r["image"] for r in rows])
    assert [r["seed"] for r in rows] == [prompt_seed(5, r.key) for r in recs]

    # the job with 2 workers and another batch size: PNG files, then WebDataset shards, equal to 1 worker
    job = _load_job("generate")
    common = [f"model.uri={tiny_pipeline}", "model.steps=2", "model.guidance=2", "seed=5", "ray.gen_workers=2",
              "ray.batch_size=3", "ray.cpus_per_actor=0.5"]
    (tmp_path / "p.json").write_text(json.dumps([r.prompt for r in recs]))
    job.main(common + [f"prompts={tmp_path / 'p.json'}", f"out={tmp_path / 'files'}"])
    from PIL import Image

    pngs = sorted((tmp_path / "files" / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(10)]
    manifest = [json.loads(line) for line in (tmp_path / "files" / "prompts.jsonl").read_text().splitlines()]
    assert len(manifest) == 10
    keyed = {r.key: i for i, r in enumerate(recs)}
    for p, m in zip(pngs, manifest):
        ref = one_worker[keyed[f"p-{int(p.stem):06d}"]]
        assert m["seed"] == prompt_seed(5, m["key"])
        np.testing.assert_array_equal(np.asarray(Image.open(p)), ref)
    job.main(common + [f"prompts={tmp_path / 'p.json'}", f"out={tmp_path / 'wds'}", "format=webdataset",
                       "shard_size=4"])
    members = {}
    for tar in sorted((tmp_path / "wds").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                members[m.name] = tf.extractfile(m).read()
    assert len([k for k in members if k.endswith(".png")]) == 10
    img = np.asarray(Image.open(io.BytesIO(members["p-000003.png"])))
    np.testing.assert_array_equal(img, one_worker[3])
    assert members["p-000003.txt"].decode() == recs[3].prompt

    # PNG files to S3 (moto on 127.0.0.1; the workers inherit the AWS_* environment)
    from wadi_core import storage

    job.main(common + [f"prompts={tmp_path / 'p.json'}", f"out=s3://{s3_bucket}/gen", "num_prompts=4"])
    listed = storage.list_files(f"s3://{s3_bucket}/gen", ".png")
    assert [u.rsplit("/", 1)[-1] for u in listed] == [f"{i:05d}.png" for i in range(4)]
    img = np.asarray(Image.open(io.BytesIO(storage.read_bytes(listed[2]))))
    np.testing.assert_array_equal(img, one_worker[2])


def test_generator_reads_export_style_adapter_files(tiny_pipeline, tmp_path):
    """``save_adapter_file`` (a bare state dict, as the export's adapters/student.safetensors) loads too."""
    from wadi_core.adapters import AdapterSpec, adapter_parameters, adapter_state_dict, apply_adapter, save_adapter_file
    from wadi_core.models import load_teacher

    spec = AdapterSpec(kind="lorad", rank=4)
    teacher = load_teacher(tiny_pipeline)
    apply_adapter(teacher.denoiser, spec, "student", "sd")
    with torch.no_grad():
        for p in adapter_parameters(teacher.denoiser, "student"):
            p.normal_(0, 0.3)
    save_adapter_file(tmp_path / "student.safetensors", adapter_state_dict(teacher.denoiser, "student"), spec, "sd")
    keys, prompts = ["a", "b"], ["a red circle", "a blue square"]
    base = ImageGenerator(ModelSpec(uri=tiny_pipeline), seed=0).generate(prompts, keys)
    moved = ImageGenerator(ModelSpec(uri=tiny_pipeline, adapter=str(tmp_path / "student.safetensors")),
                           seed=0).generate(prompts, keys)
    assert not np.array_equal(base, moved)


def test_resolve_model_dir_from_mlflow_runs_uri(tiny_pipeline, tmp_path, monkeypatch):
    import mlflow

    from pipelines.evaluate.generation import resolve_model_dir

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("WADI_CACHE", str(tmp_path / "cache"))
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("distill", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp).info.run_id
    client.log_artifacts(run, tiny_pipeline, "export")
    local = resolve_model_dir(f"runs:/{run}/export")
    assert (local / "model_index.json").exists() and (local / "unet").is_dir()
    assert resolve_model_dir(f"runs:/{run}/export") == local  # cached, not downloaded again
