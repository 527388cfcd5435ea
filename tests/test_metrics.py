"""FID statistics, Frechet distance, precision/recall and the COCO prompt recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from wadi_core.metrics import GaussianStats, frechet_distance, precision_recall
from wadi_core.metrics.coco import draw_coco_captions, prompt_list_sha256, read_prompt_list, write_prompt_list
from wadi_core.metrics.protocol import clean_resize, protocol_resize


def _features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return (rng.normal(size=(n, dim)) @ mix + shift + 0.5).astype(np.float32)


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Straight from the definition with np.mean / np.cov, as clean-fid computes it."""
    from scipy import linalg

    mu1, mu2 = a.astype(np.float64).mean(0), b.astype(np.float64).mean(0)
    s1, s2 = np.cov(a.astype(np.float64), rowvar=False), np.cov(b.astype(np.float64), rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_streaming_stats_match_numpy():
    a, b = _features(3000, 64, 0), _features(2500, 64, 1, shift=0.1)
    sa, sb = GaussianStats(64), GaussianStats(64)
    for chunk in np.array_split(a, 7):
        sa.update(torch.from_numpy(chunk))  # torch float32 input
    for chunk in np.array_split(b, 5):
        sb.update(chunk)
    mu, cov = sa.mean_cov()
    np.testing.assert_allclose(mu, a.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(a.astype(np.float64), rowvar=False), rtol=0, atol=1e-12)
    ref = _reference_fid(a, b)
    for method in ("eigh", "sqrtm"):
        assert abs(frechet_distance(sa, sb, method=method) - ref) < 1e-6


def test_merge_is_order_invariant_and_exact():
    a, b = _features(2000, 32, 2), _features(2000, 32, 3, shift=0.2)
    parts = [GaussianStats.from_features(c) for c in np.array_split(a, 6)]
    forward, backward = GaussianStats(32), GaussianStats(32)
    for p in parts:
        forward.merge(p)
    for p in reversed(parts):
        backward.merge(p)
    whole = GaussianStats.from_features(a)
    ref = GaussianStats.from_features(b)
    assert forward.n == backward.n == whole.n == 2000
    fids = [frechet_distance(s, ref) for s in (forward, backward, whole)]
    assert max(fids) - min(fids) < 1e-9
    assert abs(fids[0] - _reference_fid(a, b)) < 1e-6


def test_sqrtm_and_eigh_agree_and_identity_is_zero():
    a, b = _features(1500, 48, 4), _features(1500, 48, 5, shift=0.3)
    sa, sb = GaussianStats.from_features(a), GaussianStats.from_features(b)
    e, s = frechet_distance(sa, sb, "eigh"), frechet_distance(sa, sb, "sqrtm")
    assert e > 0.1 and abs(e - s) < 1e-8 * max(1.0, e)
    assert abs(frechet_distance(sa, sa)) < 1e-8
    with pytest.raises(ValueError, match="unknown method"):
        frechet_distance(sa, sb, "svd")


def test_singular_covariances_give_a_finite_distance():
    # fewer samples than dims -> singular covariances; the result must still be finite
    a, b = _features(10, 32, 6), _features(10, 32, 7)
    sa, sb = GaussianStats.from_features(a), GaussianStats.from_features(b)
    for method in ("sqrtm", "eigh"):
        assert np.isfinite(frechet_distance(sa, sb, method))


def test_sqrtm_retry_adds_eps_to_both_covariances(monkeypatch):
    from wadi_core.metrics import stats as stats_mod

    a, b = _features(500, 8, 10), _features(500, 8, 11, shift=0.2)
    sa, sb = GaussianStats.from_features(a), GaussianStats.from_features(b)
    calls = []
    real_sqrtm = stats_mod.linalg.sqrtm

    def flaky_sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(stats_mod.linalg, "sqrtm", flaky_sqrtm)
    with pytest.warns(UserWarning, match="singular"):
        d = frechet_distance(sa, sb, "sqrtm", eps=1e-6)
    (_, s1), (_, s2) = sa.mean_cov(), sb.mean_cov()
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(8)) @ (s2 + 1e-6 * np.eye(8)), rtol=1e-12)
    assert len(calls) == 2 and abs(d - frechet_distance(sa, sb, "eigh")) < 1e-3  # eps shifts it slightly


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_stats_save_load_roundtrip(tmp_path, suffix):
    s = GaussianStats.from_features(_features(100, 16, 8), metadata={"extractor": "x", "sha256": "ab"})
    s.save(tmp_path / f"s{suffix}")
    t = GaussianStats.load(tmp_path / f"s{suffix}")
    assert t.n == s.n and t.metadata == s.metadata
    np.testing.assert_array_equal(t.sum_outer, s.sum_outer)
    with pytest.raises(ValueError, match="safetensors or .npz"):
        s.save(tmp_path / "s.pkl")


def test_stats_reject_bad_input():
    s = GaussianStats(4)
    with pytest.raises(ValueError, match="dim"):
        s.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        s.update(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        s.mean_cov()


def _brute_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the self-distance

    def cover(q, ref, r):
        d = np.sqrt(((q[:, None] - ref[None]) ** 2).sum(-1))
        return float((d <= r[None]).any(1).mean())

    return cover(fake, real, radii(real)), cover(real, fake, radii(fake))


@pytest.mark.parametrize("k,block", [(3, 10000), (3, 37), (5, 64)])
def test_precision_recall_matches_brute_force(k, block):
    rng = np.random.default_rng(9)
    real = rng.normal(size=(300, 8))
    fake = rng.normal(size=(250, 8)) * 1.3 + 0.4
    p, r = _brute_pr(real, fake, k)
    got = precision_recall(real, fake, k=k, block=block, dtype=torch.float64)
    assert got["precision"] == pytest.approx(p, abs=1e-12)
    assert got["recall"] == pytest.approx(r, abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1  # the case is not degenerate
    got32 = precision_recall(real.astype(np.float32), fake.astype(np.float32), k=k, block=block)
    assert abs(got32["precision"] - p) <= 2 / 250 and abs(got32["recall"] - r) <= 2 / 300


def test_clean_resize_is_float_bicubic_per_channel():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    out = clean_resize(img, 299)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, np.round(out))  # not quantized
    ch = Image.fromarray(img[:, :, 1].astype(np.float32), mode="F").resize((299, 299), Image.Resampling.BICUBIC)
    np.testing.assert_allclose(out[:, :, 1], np.clip(np.asarray(ch), 0, 255))


def test_protocol_resize_center_crops_then_lanczos():
    arr = np.zeros((100, 160, 3), dtype=np.uint8)
    arr[:, 30:130] = 255  # the centred 100x100 square is white, the side bands are black
    out = protocol_resize(Image.fromarray(arr), 256)
    assert out.size == (256, 256)
    assert np.asarray(out).min() >= 250


def _coco_json(path, n_images=20, caps=5):
    images = [{"id": 100 + i, "file_name": f"COCO_val2014_{100 + i:012d}.jpg"} for i in range(n_images)]
    anns = [{"image_id": 100 + i, "id": 1000 * i + j, "caption": f" image {i} caption {j}\n"}
            for i in range(n_images) for j in range(caps)]
    path.write_text(json.dumps({"images": images, "annotations": anns[::-1]}))
    return path


def test_coco_draw_is_seeded_and_one_caption_per_image(tmp_path):
    src = _coco_json(tmp_path / "captions.json")
    a = draw_coco_captions(src, n=8, seed=1)
    b = draw_coco_captions(src, n=8, seed=1)
    c = draw_coco_captions(src, n=8, seed=2)
    assert a == b and a != c
    assert len({p.image_id for p in a}) == 8
    assert [p.image_id for p in a] == sorted(p.image_id for p in a)
    assert all(p.caption.startswith(f"image {p.image_id - 100} caption ") for p in a)
    assert all(p.caption == p.caption.strip() for p in a)
    full = draw_coco_captions(src, seed=1)
    assert len(full) == 20
    sha = write_prompt_list([p.caption for p in a], tmp_path / "list.txt")
    assert sha == prompt_list_sha256([p.caption for p in a])
    assert read_prompt_list(tmp_path / "list.txt", sha) == [p.caption for p in a]
    with pytest.raises(ValueError, match="sha256"):
        read_prompt_list(tmp_path / "list.txt", "0" * 64)


def test_stored_prompt_lists_match_their_hashes():
    """data/prompts/manifest.json: stored lists keep their sha256; the domain list regenerates exactly."""
    from pathlib import Path

    from pipelines.evaluate.generation import load_prompts

    repo = Path(__file__).resolve().parents[1]
    manifest = json.loads((repo / "data/prompts/manifest.json").read_text())
    checked = []
    for name, entry in manifest.items():
        if not entry["path"]:  # a list we cannot draw here (documented in its "origin")
            continue
        assert not entry["path"].startswith(("/", "..")), f"{name}: lists ship inside the repository"
        prompts = read_prompt_list(repo / entry["path"], entry["sha256"])  # missing file: an error
        assert len(prompts) == entry["num"], name
        if entry["source"].startswith("domain:"):
            assert load_prompts(entry["source"])[1]["sha256"] == entry["sha256"]
        checked.append(name)
    assert sorted(checked) == ["coco2014_val_30k", "domain_eval_5000_seed1_train"]
