"""Metrics on Ray Data: features and prompt scores in actors, exact merge of FID statistics.

Flow: prompt rows -> ``GeneratorActor`` (images) -> ``MetricActor`` (protocol resize, extractor
features, scorer scores; the image column is dropped) -> materialised (features are small) ->
``partial_stats`` per block of rows -> partial :class:`GaussianStats` merged on the driver (a sum,
so the result does not depend on how the rows were split over workers).

Extractor / scorer specs (strings, so they travel to actors): ``domain`` (the embedded domain's
evaluator, the default), ``inception:URI``, ``clip:URI``, ``hps:URI``, ``thumbnail`` /
``mean_intensity`` (weight-free, for smoke tests), or ``import:module:factory`` (any callable
returning a FeatureExtractor / PromptScorer).
"""

from __future__ import annotations

import hashlib
import importlib
import io as _io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import load, save

from wadi_core import storage
from wadi_core.domain import load_domain_evaluator
from wadi_core.domain.data import make_render_set
from wadi_core.domain.evaluator import DEFAULT_EVALUATOR_DIR
from wadi_core.images import image_grid
from wadi_core.metrics import (ClipScorer, GaussianStats, HPSv2Scorer, InceptionExtractor, frechet_distance,
                               precision_recall)
from wadi_core.metrics.protocol import pils_to_tensor, protocol_resize
from wadi_core.metrics.simple import MeanIntensityScorer, ThumbnailExtractor
from wadi_core.metrics.weights import resolve_weights, sha256_file

from pipelines.evaluate.config import MetricsSpec
from pipelines.evaluate.generation import encode_png

__all__ = [
    "build_extractor",
    "build_scorer",
    "MetricActor",
    "partial_stats",
    "Reference",
    "compute_metrics",
    "build_reference",
    "sample_grid",
]


def _device(spec: MetricsSpec) -> str:
    return spec.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _from_import(target: str) -> Any:
    module, _, attr = target.partition(":")
    if not attr:
        raise ValueError(f"import spec {target!r} must be 'package.module:factory'")
    return getattr(importlib.import_module(module), attr)()


def _domain_evaluator() -> Any:
    return load_domain_evaluator()


def build_extractor(spec: MetricsSpec) -> Any:
    """The FeatureExtractor named by ``spec.extractor`` (None for ``none``: no FID / precision-recall)."""
    kind, _, arg = spec.extractor.partition(":")
    if kind == "none":
        return None
    if kind == "domain":
        return _domain_evaluator()
    if kind == "inception":
        return InceptionExtractor(arg, device=_device(spec))
    if kind == "thumbnail":
        return ThumbnailExtractor(int(arg or 4))
    if kind == "import":
        return _from_import(arg)
    raise ValueError(f"unknown extractor {spec.extractor!r}: use domain, inception:URI or import:module:factory")


def build_scorer(name: str, spec: MetricsSpec) -> Any:
    kind, _, arg = name.partition(":")
    if kind == "domain":
        return _domain_evaluator()
    if kind == "clip":
        return ClipScorer(arg, model_name=spec.clip_model, device=_device(spec))
    if kind == "hps":
        return HPSv2Scorer(arg, model_name=spec.hps_model, device=_device(spec))
    if kind == "mean_intensity":
        return MeanIntensityScorer()
    if kind == "import":
        return _from_import(arg)
    raise ValueError(f"unknown scorer {name!r}: use domain, clip:URI, hps:URI or import:module:factory")


_SCORE_NAMES = {"domain": "alignment", "clip": "clip_score", "hps": "hpsv2", "mean_intensity": "mean_intensity"}


def score_name(scorer_spec: str, scorer: Any) -> str:
    """Metric name of a scorer: alignment (domain), clip_score, hpsv2, or the scorer's own name."""
    name = _SCORE_NAMES.get(scorer_spec.partition(":")[0]) or str(getattr(scorer, "name", "score"))
    return name.replace("/", "_").replace(".", "_")


def images_for_metrics(images: np.ndarray, protocol_size: int) -> torch.Tensor:
    """uint8 (B,H,W,3) -> float [0,1] (B,3,H,W), through the COCO protocol resize if asked."""
    if protocol_size:
        return pils_to_tensor([protocol_resize(Image.fromarray(np.asarray(im)), protocol_size) for im in images])
    return torch.from_numpy(np.ascontiguousarray(np.stack(list(images)))).permute(0, 3, 1, 2).float() / 255.0


class MetricActor:
    """Ray Data callable class: features + scores per image; drops the image (keeps PNGs for a grid)."""

    def __init__(self, spec: dict[str, Any], grid_keys: tuple[str, ...] = ()):
        self.spec = MetricsSpec(**{**spec, "scorers": tuple(spec.get("scorers", ()))})
        self.extractor = build_extractor(self.spec)
        # the domain evaluator is both extractor and scorer: load it once
        shared = self.extractor if self.spec.extractor == "domain" else None
        self.scorers = [shared if (s == "domain" and shared is not None) else build_scorer(s, self.spec)
                        for s in self.spec.scorers]
        self.grid_keys = set(grid_keys)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = images_for_metrics(batch["image"], self.spec.protocol_size)
        out = {k: v for k, v in batch.items() if k != "image"}
        if self.extractor is not None:
            out["features"] = self.extractor.features(x).float().cpu().numpy()
        prompts = [str(p) for p in batch["prompt"]] if "prompt" in batch else None
        for spec_str, scorer in zip(self.spec.scorers, self.scorers):
            if prompts is None:
                break
            scale = float(getattr(scorer, "report_scale", 1.0))  # HPS is reported x100
            out[f"score_{score_name(spec_str, scorer)}"] = scorer.score(x, prompts).float().cpu().numpy() * scale
        out["png"] = np.array([encode_png(np.asarray(im)) if str(k) in self.grid_keys else b""
                               for im, k in zip(batch["image"], batch["key"])], dtype=object)
        return out


def partial_stats(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data function: one row of float64 running sums for a block of feature rows."""
    s = GaussianStats.from_features(np.stack(list(batch["features"])))
    return {"n": np.array([s.n]), "sum": s.sum[None], "sum_outer": s.sum_outer[None]}


def merge_partials(rows: list[dict[str, Any]] | dict[str, np.ndarray]) -> GaussianStats:
    """Merge partial-statistics rows (from :func:`partial_stats`) exactly."""
    if isinstance(rows, dict):
        rows = [{k: rows[k][i] for k in rows} for i in range(len(rows["n"]))]
    if not rows:
        raise ValueError("no partial statistics to merge (was the dataset empty?)")
    total = GaussianStats(int(np.asarray(rows[0]["sum"]).shape[-1]))
    for r in rows:
        total.merge(GaussianStats.from_state_dict(r))
    return total


# ---------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """Reference statistics, real features (for precision/recall) and their manifest."""

    stats: GaussianStats
    features: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)

    def save(self, uri: str) -> None:
        tmp = _tmpdir()
        self.stats.save(tmp / "stats.safetensors")
        storage.write_bytes(storage.join(uri, "stats.safetensors"), (tmp / "stats.safetensors").read_bytes())
        storage.write_bytes(storage.join(uri, "features.safetensors"),
                            save({"features": np.ascontiguousarray(self.features, dtype=np.float32)}))
        storage.write_bytes(storage.join(uri, "manifest.json"), json.dumps(self.manifest, indent=2).encode())

    @classmethod
    def load(cls, uri: str) -> "Reference":
        local = storage.materialize(uri)
        stats = GaussianStats.load(local / "stats.safetensors")
        features = load((local / "features.safetensors").read_bytes())["features"]
        manifest = json.loads((local / "manifest.json").read_text())
        return cls(stats, features, manifest)

    @classmethod
    def exists(cls, uri: str) -> bool:
        fs, path = storage.filesystem(uri)
        return fs.exists(f"{path}/manifest.json")


def _tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="wadi-eval-"))


def features_and_stats(ds: Any, spec: MetricsSpec, *, concurrency: int = 1, batch_size: int = 64,
                       cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, accelerator_type: str | None = None,
                       grid_keys: tuple[str, ...] = (),
                       stats_rows: int = 4096) -> tuple[list[dict[str, Any]], GaussianStats | None]:
    """Run :class:`MetricActor` over an image dataset; return per-row results and merged stats."""
    import ray.data  # noqa: PLC0415 -- Ray only on the cluster path

    feats = ds.map_batches(
        MetricActor, fn_constructor_kwargs={"spec": asdict(spec), "grid_keys": tuple(grid_keys)},
        compute=ray.data.ActorPoolStrategy(size=concurrency), batch_size=batch_size, num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor, accelerator_type=accelerator_type if gpus_per_actor else None, batch_format="numpy",
    ).materialize()
    stats = None
    if spec.extractor != "none":
        partials = feats.map_batches(partial_stats, batch_size=stats_rows, batch_format="numpy",
                                     num_cpus=0.25).take_all()
        stats = merge_partials(partials)
    rows = sorted(feats.take_all(), key=lambda r: (str(r.get("group", "")), int(r.get("idx", 0))))
    return rows, stats


def build_reference(image_source: str, spec: MetricsSpec, **ray_kwargs: Any) -> Reference:
    """Reference statistics from real images, computed once.

    ``image_source``: a local folder / ``s3://`` prefix of images (``.jpg``/``.jpeg``/``.png``,
    all files, sorted), or ``domain:N:SEED:SPLIT`` (renders of the embedded domain).
    """
    import ray.data  # noqa: PLC0415 -- Ray only on the cluster path

    extractor_desc = spec.extractor
    if image_source.startswith("domain:"):
        _, n, seed, *rest = image_source.split(":")
        renders = make_render_set(int(n), int(seed), rest[0] if rest else "train", progress=True)
        rows = [{"idx": i, "key": f"real-{i:06d}", "group": "", "image": renders.images[i]}
                for i in range(len(renders.images))]
        names = [f"{image_source}#{i}" for i in range(len(rows))]
        extra = {"images_sha256": hashlib.sha256(np.ascontiguousarray(renders.images).tobytes()).hexdigest()}
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 512, 64)))
    else:
        files = [f for f in storage.list_files(image_source) if f.lower().endswith((".jpg", ".jpeg", ".png"))]
        if not files:
            raise FileNotFoundError(f"no .jpg/.png images under {image_source}")
        names = [f[len(str(storage.filesystem(image_source)[1])):].lstrip("/") if not storage.is_remote(f)
                 else f[len(image_source):].lstrip("/") for f in files]
        if not spec.protocol_size:
            raise ValueError("real photos come in many sizes: set protocol_size (256 for the COCO protocol)")
        rows = [{"idx": i, "key": f"real-{i:06d}", "group": "", "path": f} for i, f in enumerate(files)]
        extra = {}
        ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 256, 256)))
        ds = ds.map_batches(_load_real_images, fn_kwargs={"size": spec.protocol_size}, batch_format="numpy",
                            num_cpus=0.25)
    rows, stats = features_and_stats(ds, replace(spec, scorers=()), **ray_kwargs)  # features only
    features = np.stack([np.asarray(r["features"], dtype=np.float32) for r in rows])
    manifest = {
        "image_source": image_source,
        "num_images": len(names),
        "file_list_sha256": hashlib.sha256(("\n".join(names) + "\n").encode()).hexdigest(),
        "preprocessing": (f"center crop to short side, PIL LANCZOS to {spec.protocol_size}, then the extractor's own"
                          if spec.protocol_size else "images as they are, then the extractor's own"),
        "extractor": extractor_desc,
        "extractor_weights_sha256": extractor_weights_sha256(spec),
        "feature_dim": int(features.shape[1]),
        "covariance": "float64 running sums, n - 1",
        **extra,
    }
    stats.metadata.update({k: str(v) for k, v in manifest.items()})
    return Reference(stats, features, manifest)


def extractor_weights_sha256(spec: MetricsSpec) -> str | None:
    """sha256 of the extractor's weights file (None for weight-free extractors)."""
    kind, _, arg = spec.extractor.partition(":")
    if kind == "inception":
        return resolve_weights(arg, "Inception-V3")[1]
    if kind != "domain":
        return None
    try:
        return sha256_file(DEFAULT_EVALUATOR_DIR / "model.safetensors")
    except OSError:
        return None


def _load_real_images(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    images = []
    for path in batch["path"]:
        img = Image.open(_io.BytesIO(storage.read_bytes(str(path))))
        images.append(np.asarray(protocol_resize(img, size), dtype=np.uint8))
    out = {k: v for k, v in batch.items() if k != "path"}
    out["image"] = np.stack(images)
    return out


# ---------------------------------------------------------------------------------- results
def compute_metrics(rows: list[dict[str, Any]], stats: GaussianStats | None, reference: Reference | None,
                    spec: MetricsSpec) -> dict[str, float]:
    """FID (eigh), precision/recall, mean scores (overall and per group)."""
    metrics: dict[str, float] = {"num_images": float(len(rows))}
    if reference is not None and stats is not None:
        metrics["fid"] = frechet_distance(stats, reference.stats, method="eigh")
        fake = np.stack([np.asarray(r["features"], dtype=np.float32) for r in rows])
        pr = precision_recall(reference.features, fake, k=spec.pr_k, device=_device(spec))
        metrics.update(precision=pr["precision"], recall=pr["recall"])
    score_cols = sorted({k for r in rows[:1] for k in r if k.startswith("score_")})
    groups = sorted({str(r.get("group", "")) for r in rows})
    for col in score_cols:
        name = col[len("score_"):]
        metrics[name] = float(np.mean([float(r[col]) for r in rows]))
        if len(groups) > 1:
            for g in groups:
                metrics[f"{name}/{g}"] = float(np.mean([float(r[col]) for r in rows if str(r["group"]) == g]))
    return metrics


def sample_grid(rows: list[dict[str, Any]], cols: int = 8) -> Any:
    """PIL grid of the rows that carry a PNG (the grid keys), in order; None when there are none."""
    tiles = [Image.open(_io.BytesIO(r["png"])) for r in rows if len(r.get("png", b"")) > 0]
    return image_grid(tiles, cols=min(cols, len(tiles))) if tiles else None


def env_for_workers() -> dict[str, str]:
    """Non-secret environment the Ray workers need (S3 endpoint, offline flags, cache, MLflow URI).

    Credentials are not passed here: local workers inherit the driver's environment and cluster
    workers get theirs from the cluster (instance roles, Kubernetes secrets).
    """
    keys = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "WADI_CACHE",
            "MLFLOW_TRACKING_URI")
    return {k: os.environ[k] for k in keys if k in os.environ and "@" not in os.environ[k]}
