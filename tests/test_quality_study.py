"""experiments/quality/full_capacity_student.py: the student with its own UNet copy trains, keeps
LoRaD's promises on conv filters, and its export holds exactly the trained (averaged) student."""

from __future__ import annotations

import torch
from torch import nn

from experiments.quality.full_capacity_student import RowRotation, main, student_copy


def test_row_rotation_of_a_conv_keeps_filter_norms_and_starts_as_identity():
    conv = nn.Conv2d(4, 6, 3)
    rot = RowRotation(conv.weight, rank=2)
    torch.testing.assert_close(rot(conv.weight), conv.weight)  # A = 0: identity
    with torch.no_grad():
        rot.A.normal_()
    turned = rot(conv.weight)
    assert not torch.allclose(turned, conv.weight)
    torch.testing.assert_close(turned.flatten(1).norm(dim=1), conv.weight.flatten(1).norm(dim=1))


def test_lorad_student_covers_convs_and_leaves_the_teacher_alone():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    own, params = student_copy(unet, "lorad", rank=2)
    convs = [m for m in own.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(hasattr(m, "parametrizations") for m in convs)
    assert sum(p.numel() for p in params) < sum(p.numel() for p in unet.parameters())
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k])
    # lorad_affine adds every bias and normalisation scale; full_weights trains only the weight matrices
    _, affine = student_copy(unet, "lorad_affine", rank=2)
    n_bias = sum(1 for n, _ in unet.named_parameters() if n.endswith("bias"))
    assert len(affine) > len(params) + n_bias - 1
    _, weights = student_copy(unet, "full_weights", rank=2)
    assert len(weights) == sum(1 for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def test_study_trains_and_exports_its_student(tmp_path):
    from diffusers import DiffusionPipeline

    from wadi_core.models import load_teacher

    teacher = load_teacher("embedded").denoiser.state_dict()
    for mode in ("lorad", "full"):
        out = tmp_path / mode
        main(["--out", str(out), "--mode", mode, "--steps", "2", "--batch", "2", "--lr", "1e-2"])
        pipe = DiffusionPipeline.from_pretrained(out / "export")
        exported = pipe.unet.state_dict()
        assert set(exported) == set(teacher)  # a plain UNet: rotations baked in, no extra keys
        # The student moved away from the teacher (2 steps at lr 1e-2), and the export holds it.
        assert any(not torch.equal(exported[k], teacher[k]) for k in teacher), mode
        img = pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, output_type="pt").images
        assert torch.isfinite(img).all() and img.shape[1] == 3
