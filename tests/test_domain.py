"""The embedded domain: deterministic renders, caption round trip, splits, tokenizer, evaluator, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wadi_core.domain import (ALL_COMBOS, ATTRIBUTE_NAMES, HELDOUT_COMBOS, TRAIN_COMBOS, Attributes, caption,
                              eval_prompts, find_attributes, parse_caption, render, sample_attributes, train_prompts)


def test_render_is_deterministic_per_seed():
    a = Attributes("triangle", "purple", "large", "top")
    x1, x2 = render(a, seed=7), render(a, seed=7)
    assert x1.dtype == np.uint8 and x1.shape == (32, 32, 3)
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, render(a, seed=8)), "jitter must depend on the seed"
    assert render(a, seed=7, size=64).shape == (64, 64, 3)


def test_render_shows_the_attributes():
    # The object's colour dominates where it is drawn, and it sits on the named side.
    for pos, (dy, dx) in {"left": (0, -1), "right": (0, 1), "top": (-1, 0), "bottom": (1, 0)}.items():
        img = render(Attributes("square", "red", "large", pos), seed=3).astype(float)
        redness = img[..., 0] - img[..., 1:].mean(-1)
        ys, xs = np.nonzero(redness > 100)
        assert len(ys) > 20
        offset = np.array([ys.mean() - 15.5, xs.mean() - 15.5])
        named = offset @ np.array([dy, dx])
        other = offset @ np.array([dx, dy])
        assert named > 4 and abs(other) < 3, (pos, offset)
    small = (render(Attributes("circle", "white", "small", "left"), 1).sum(-1) > 400).sum()
    large = (render(Attributes("circle", "white", "large", "left"), 1).sum(-1) > 400).sum()
    assert large > 2 * small


def test_caption_round_trip_all_combinations():
    assert len(ALL_COMBOS) == 144 and len(set(ALL_COMBOS)) == 144
    for a in ALL_COMBOS:
        assert parse_caption(caption(a)) == a
    assert parse_caption("A Large RED circle, on the left!") == Attributes("circle", "red", "large", "left")
    assert find_attributes("a blue thing") == {"colour": "blue"}
    with pytest.raises(ValueError, match="does not name the"):
        parse_caption("a blue circle")
    with pytest.raises(ValueError, match=r"shape='hexagon' is not one of"):
        Attributes("hexagon", "red", "large", "left")


def test_heldout_split_is_disjoint_and_never_trained_on():
    assert len(HELDOUT_COMBOS) == 12 and set(HELDOUT_COMBOS).isdisjoint(TRAIN_COMBOS)
    for name in ATTRIBUTE_NAMES:  # every single value still occurs in training
        assert {getattr(a, name) for a in TRAIN_COMBOS} == {getattr(a, name) for a in ALL_COMBOS}
    stream = train_prompts(seed=0)
    seen = {parse_caption(next(stream)) for _ in range(3000)}
    assert seen.isdisjoint(HELDOUT_COMBOS) and len(seen) == len(TRAIN_COMBOS)
    held = eval_prompts(24, seed=1, split="heldout")
    assert {parse_caption(p) for p in held} == set(HELDOUT_COMBOS)
    assert eval_prompts(50, seed=3) == eval_prompts(50, seed=3) != eval_prompts(50, seed=4)
    rng = np.random.default_rng(0)
    assert all(sample_attributes(rng, "heldout") in HELDOUT_COMBOS for _ in range(20))
    with pytest.raises(ValueError, match="unknown split"):
        eval_prompts(3, split="test")


def test_tokenizer_has_one_token_per_domain_word(tmp_path):
    from wadi_core.domain.attributes import vocabulary
    from wadi_core.domain.tokenizer import build_tokenizer

    tok = build_tokenizer(tmp_path, model_max_length=32)
    for word in vocabulary():
        assert len(tok(word).input_ids) == 3, word  # BOS, word, EOS
    ids = tok("a small blue square on the right").input_ids
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a small blue square on the right"
    assert len(tok("Zebra & café 42").input_ids) > 2  # any text still tokenizes (byte fallback)


def test_evaluator_save_load_and_protocols(tmp_path):
    from wadi_core.domain.evaluator import DomainEvaluator, EvaluatorConfig, load_domain_evaluator

    torch.manual_seed(0)
    model = DomainEvaluator(EvaluatorConfig(channels=(16, 16, 16), feature_dim=32)).eval()
    model.save(tmp_path)
    loaded = load_domain_evaluator(tmp_path)
    x = torch.rand(3, 3, 48, 48)  # any size is resized
    assert loaded.features(x).shape == (3, loaded.feature_dim) == (3, 32)
    torch.testing.assert_close(loaded.features(x), model.features(x))
    scores = loaded.score(x, ["a small red circle on the left", "a blue square", "large triangle at the top"])
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    with pytest.raises(ValueError, match="names no domain attribute"):
        loaded.score(x[:1], ["a photo of a cat"])


def test_shipped_evaluator_recognises_renders():
    from wadi_core.domain.evaluator import load_domain_evaluator, render_accuracy

    model = load_domain_evaluator()
    assert model.name == "domain" and model.feature_dim == 128
    acc = render_accuracy(model, n=300, seed=999)
    assert min(acc.values()) >= 0.97, acc
    imgs = torch.stack([torch.from_numpy(render(a, 5)).permute(2, 0, 1).float() / 255 for a in ALL_COMBOS[:20]])
    right = model.score(imgs, [caption(a) for a in ALL_COMBOS[:20]])
    wrong = model.score(imgs, [caption(a) for a in ALL_COMBOS[20:40]])
    assert right.mean() > 0.95 and wrong.mean() < right.mean() - 0.3


def test_training_state_round_trip(tmp_path):
    from wadi_core.domain.checkpoint import load_training_state, save_training_state

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    save_training_state(tmp_path / "s", {"net": net}, opt, gen, {"step": 1, "phase": "x"})
    expected = torch.randn(3, generator=gen)
    net2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    gen2 = torch.Generator()
    meta = load_training_state(tmp_path / "s", {"net": net2}, opt2, gen2)
    assert meta == {"step": 1, "phase": "x"}
    torch.testing.assert_close(net2.weight, net.weight)
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    torch.testing.assert_close(torch.randn(3, generator=gen2), expected)


def test_generated_report_measures_precision_on_the_samples_it_returns():
    """The local quality report (jobs/distill_local.py --eval-only, jobs/eval_teacher_domain.py) gives
    precision / recall of exactly the images it sampled, against the real features it was handed."""
    from wadi_core.domain.evaluator import load_domain_evaluator
    from wadi_core.domain.quality import feature_stats, generated_report, real_features
    from wadi_core.metrics import precision_recall
    from wadi_core.models import EMBEDDED_TEACHER

    evaluator = load_domain_evaluator()
    real_f = real_features(evaluator, n=200)
    report, images = generated_report(str(EMBEDDED_TEACHER), evaluator, feature_stats(real_f), 24, 2, 3.0,
                                      real_feats=real_f)
    assert images.shape[0] == 24
    expected = precision_recall(real_f, evaluator.features(images), k=3)
    assert report["precision"] == pytest.approx(expected["precision"])
    assert report["recall"] == pytest.approx(expected["recall"])
    assert 0 <= report["all_correct"] <= report["alignment"] <= 1 and report["fid"] > 0
    # Real renders score near the top; the 2-step teacher's samples do not look like them.
    assert precision_recall(real_f, real_features(evaluator, n=200, seed=5), k=3)["precision"] > report["precision"]
    without, _ = generated_report(str(EMBEDDED_TEACHER), evaluator, feature_stats(real_f), 8, 1, 1.0)
    assert "precision" not in without
