"""Inception / CLIP / HPS code paths with tiny random models saved to a file and loaded by path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from wadi_core.metrics import ClipScorer, FeatureExtractor, HPSv2Scorer, InceptionExtractor, PromptScorer
from wadi_core.metrics.clip import hps_preprocess
from wadi_core.metrics.protocol import clean_resize, tensor_to_pils

open_clip = pytest.importorskip("open_clip")

TINY = "wadi-tiny-clip-test"


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    """Register a tiny open_clip architecture (random init, offline)."""
    d = tmp_path_factory.mktemp("open_clip_cfg")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (d / f"{TINY}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return TINY


class _StandInInception(nn.Module):
    """Same calling convention as clean-fid's TorchScript: a ``layers`` module on (x-128)/128."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _images(n=3, h=40, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255)


def test_inception_extractor_torchscript_path(tmp_path):
    torch.manual_seed(0)
    module = _StandInInception().eval()
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(module).save(str(path))
    ext = InceptionExtractor(path, feature_dim=32, batch_size=2)
    assert isinstance(ext, FeatureExtractor)
    assert len(ext.sha256) == 64
    images = _images()
    feats = ext.features(images)
    assert feats.shape == (3, 32)
    # independent recomputation: uint8 -> clean resize -> (x-128)/128 -> layers
    u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    x = torch.from_numpy(np.stack([clean_resize(a) for a in u8])).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = module.layers((x - 128) / 128)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sha256"):
        InceptionExtractor(path, feature_dim=32, expected_sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        InceptionExtractor(tmp_path / "missing.pt")


def _cos(model, pixels, text):
    with torch.no_grad():
        a = model.encode_image(pixels)
        b = model.encode_text(text)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def test_clip_scorer_from_local_file(tmp_path, tiny_clip_name):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(tiny_clip_name, pretrained=None)
    path = tmp_path / "tiny_clip.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    scorer = ClipScorer(path, model_name=tiny_clip_name, batch_size=2)
    assert isinstance(scorer, PromptScorer)
    images, prompts = _images(3), ["a red circle", "a blue square", "a cat"]
    got = scorer.score(images, prompts)
    assert got.shape == (3,) and torch.all(got.abs() <= 1)
    tok = open_clip.get_tokenizer(tiny_clip_name)
    pixels = torch.stack([preprocess(p) for p in tensor_to_pils(images)])
    ref = _cos(model.eval(), pixels, tok(["A photo depicts " + p for p in prompts]))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # the prefix matters: a scorer without it gives other numbers
    bare = ClipScorer(path, model_name=tiny_clip_name, prefix="")
    assert not torch.allclose(bare.score(images, prompts), got)


def test_hps_scorer_loads_state_dict_checkpoint(tmp_path, tiny_clip_name):
    torch.manual_seed(1)
    model = open_clip.create_model(tiny_clip_name, pretrained=None).eval()
    path = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    scorer = HPSv2Scorer(path, model_name=tiny_clip_name)
    images, prompts = _images(2, 64, 32), ["a photo of a dog", "concept art of a castle"]
    got = scorer.score(images, prompts)
    tok = open_clip.get_tokenizer(tiny_clip_name)
    pixels = torch.stack([hps_preprocess(p, 224) for p in tensor_to_pils(images)])
    torch.testing.assert_close(got, _cos(model, pixels, tok(prompts)), rtol=1e-4, atol=1e-5)
    assert scorer.report_scale == 100.0
    torch.save({"weights": model.state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="state_dict"):
        HPSv2Scorer(tmp_path / "bad.pt", model_name=tiny_clip_name)


def test_hps_preprocess_pads_longest_side():
    from PIL import Image

    img = Image.new("RGB", (100, 50), (255, 255, 255))
    x = hps_preprocess(img, 224)
    assert x.shape == (3, 224, 224)
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    black = -torch.tensor([0.48145466, 0.4578275, 0.40821073]) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(x[:, 112, 112], white, atol=1e-3, rtol=0)  # the image, centred
    torch.testing.assert_close(x[:, 5, 112], black, atol=1e-6, rtol=0)  # the zero padding above it


def test_inception_weights_from_s3(tmp_path, s3_bucket, monkeypatch):
    from wadi_core import storage

    monkeypatch.setenv("WADI_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_StandInInception().eval()).save(str(path))
    uri = f"s3://{s3_bucket}/weights/inception-2015-12-05.pt"
    storage.write_bytes(uri, path.read_bytes())
    local = InceptionExtractor(path, feature_dim=32)
    remote = InceptionExtractor(uri, feature_dim=32)
    assert remote.sha256 == local.sha256
    images = _images(2)
    torch.testing.assert_close(remote.features(images), local.features(images))
