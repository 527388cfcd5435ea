"""Trainable-parameter counts on the real architectures, built on the meta device (no weights)."""

from __future__ import annotations

import pytest
import torch

from wadi_core.adapters import add_adapter, count_trainable


def _sd15():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8, layers_per_block=2)


def _sd21():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=96, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                                attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                                upcast_attention=True, layers_per_block=2)


def _pixart_xl_256():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(sample_size=32, num_layers=28, num_attention_heads=16, attention_head_dim=72,
                                    in_channels=4, out_channels=8, patch_size=2, caption_channels=4096,
                                    cross_attention_dim=1152, norm_type="ada_norm_single",
                                    use_additional_conditions=False)


# (architecture, kind, rank, preset, paper's count in millions, decimals reported)
PAPER = [
    pytest.param(_sd15, "lorad", 256, "unet_student", 83.80, 2, id="sd15-lorad-r256"),
    pytest.param(_sd21, "lorad", 256, "unet_student", 94.43, 2, id="sd21-lorad-r256"),
    pytest.param(_pixart_xl_256, "lorad", 128, "dit_student", 81.22, 2, id="pixart256-lorad-r128"),
    # The official code also adapts adaln_single's three Linears (train_dkd_dit.py): 82.56 M.
    pytest.param(_pixart_xl_256, "lorad", 128, "dit_student_adaln", 82.56, 2, id="pixart256-lorad-r128-adaln"),
    pytest.param(_sd15, "lora", 256, "unet_student", 108.1, 1, id="sd15-lora-r256"),
]


@pytest.mark.parametrize("build,kind,rank,preset,millions,decimals", PAPER)
def test_paper_trainable_counts(build, kind, rank, preset, millions, decimals) -> None:
    with torch.device("meta"):
        model = build()
        add_adapter(model, kind, "student", rank, preset)
    assert round(count_trainable(model, "student") / 1e6, decimals) == pytest.approx(millions)
    assert count_trainable(model) == count_trainable(model, "student")  # base frozen


def test_fake_sets_are_subsets_and_smaller() -> None:
    with torch.device("meta"):
        model = _sd15()
        add_adapter(model, "lorad", "student", 256, "unet_student")
        add_adapter(model, "lorad", "fake", 32, "unet_fake")
    names = {n for n, m in model.named_modules() if hasattr(m, "adapters") and "fake" in m.adapters}
    assert names and not any(n.endswith(("proj_in", "proj_out", "time_emb_proj")) for n in names)
    assert count_trainable(model, "fake") < count_trainable(model, "student") / 8
