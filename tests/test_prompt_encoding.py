"""``vsd.prompt_encoding`` on the embedded teacher's CLIP: "diffusers" (no attention mask, the default)
and "official" (training prompts with the mask, the null prompt without, as the official WaDi code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wadi_core.models import load_teacher
from wadi_core.vsd import AdapterSpec, VSDConfig, WaDiDistiller

PROMPTS = ["a large red circle on the left", "a small blue square"]


@pytest.fixture
def teacher():
    """A fresh embedded teacher (a distiller adds its adapters to it)."""
    return load_teacher("embedded")


def _distiller(teacher, encoding: str) -> WaDiDistiller:
    return WaDiDistiller(teacher, VSDConfig(student=AdapterSpec("lorad", 2), fake=AdapterSpec("lorad", 2),
                                            prompt_encoding=encoding))


def _tokens(teacher, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tok = teacher.tokenizer(prompts, padding="max_length", max_length=teacher.max_text_length, truncation=True,
                            return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def test_default_is_the_diffusers_encoding(teacher):
    assert VSDConfig().prompt_encoding == "diffusers"
    d = _distiller(teacher, "diffusers")
    ids, _ = _tokens(teacher, PROMPTS)
    with torch.no_grad():
        unmasked = teacher.text_encoder(ids)[0]
    torch.testing.assert_close(d.teacher.encode_train_prompts(PROMPTS).embeds, unmasked, rtol=0, atol=0)


def test_official_encoding_masks_training_prompts_only(teacher):
    d = _distiller(teacher, "official")
    ids, mask = _tokens(teacher, PROMPTS)
    with torch.no_grad():
        masked, unmasked = teacher.text_encoder(ids, attention_mask=mask)[0], teacher.text_encoder(ids)[0]
    train = d.teacher.encode_train_prompts(PROMPTS)
    assert train.mask is None  # the UNet takes no mask: only the embeddings change
    torch.testing.assert_close(train.embeds, masked, rtol=0, atol=0)
    # CLIP attends causally, so the real tokens (BOS, words, EOS) cannot see the padding either way;
    # the padding positions are where the two encodings differ (the UNet attends to all 77).
    real = mask.bool()
    torch.testing.assert_close(train.embeds[real], unmasked[real], rtol=1e-5, atol=1e-5)
    pad_shift = (train.embeds[~real] - unmasked[~real]).abs().max().item()
    assert pad_shift > 0.1, pad_shift
    # The null prompt and the sample prompts keep the unmasked encoding (the official encode_prompt).
    null_ids, _ = _tokens(teacher, [""])
    with torch.no_grad():
        torch.testing.assert_close(d.teacher.null_cond(1).embeds, teacher.text_encoder(null_ids)[0], rtol=0, atol=0)
    torch.testing.assert_close(d.teacher.encode_prompts(PROMPTS).embeds, unmasked, rtol=0, atol=0)


def test_text_encoder_actors_encode_training_prompts_the_same_way(teacher):
    """``data.text_encoding=actors``: the actor stage gives the worker's ``encode_train_prompts``."""
    from pipelines.data.text_encoding import TextEncoderActor

    batch = {"caption": np.array(PROMPTS + ["dropped"]), "bad": np.array([0, 0, 1])}
    for encoding in ("diffusers", "official"):
        d = _distiller(load_teacher("embedded"), encoding)
        rows = TextEncoderActor("embedded", clip_mask=encoding == "official")(batch)
        expected = d.teacher.encode_train_prompts(PROMPTS).embeds
        torch.testing.assert_close(torch.from_numpy(rows["embeds"][:2]), expected, rtol=0, atol=1e-6)
        assert not rows["embeds"][2].any()  # a bad row gets zeros


def test_prompt_encoding_is_validated():
    with pytest.raises(ValueError, match="prompt_encoding must be 'diffusers' or 'official'"):
        VSDConfig(prompt_encoding="masked")
