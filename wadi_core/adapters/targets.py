"""Which ``nn.Linear`` layers an adapter goes on: paper presets, explicit names, or a regex."""

from __future__ import annotations

import re
from typing import Callable, Sequence, Union

from torch import nn

__all__ = ["PRESETS", "Targets", "resolve_targets"]

Targets = Union[str, "re.Pattern[str]", Sequence[str]]

_UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")
_UNET_FAKE_EXCLUDED = ("proj_in", "proj_out", "time_emb_proj")


def unet_student(name: str) -> bool:
    """Every ``nn.Linear`` inside ``down_blocks``, ``mid_block``, ``up_blocks`` of a UNet2DConditionModel.

    Attention q/k/v/out, feed-forward, resnet ``time_emb_proj``, and ``proj_in``/``proj_out`` when they
    are Linear (SD2.1). Convs, ``time_embedding``, ``conv_in``/``conv_out`` are not Linear or not inside
    the blocks. With LoRaD r=256: SD1.5 83.80 M, SD2.1 94.43 M trainable (paper); LoRA r=256: 108.1 M.
    SDXL takes the same rule (no published WaDi set): 530.60 M at r=256; its ``add_embedding`` (pooled
    text + time ids) is outside the blocks and stays frozen, like ``time_embedding`` (and DMD2's SDXL LoRA).
    """
    return name.startswith(_UNET_BLOCKS)


def unet_fake(name: str) -> bool:
    """``unet_student`` minus ``proj_in``, ``proj_out`` and ``time_emb_proj`` (the fake score set)."""
    return unet_student(name) and name.rsplit(".", 1)[-1] not in _UNET_FAKE_EXCLUDED


def dit_student(name: str) -> bool:
    """Every ``nn.Linear`` of a PixArtTransformer2DModel except the three ``adaln_single`` Linears.

    That is the 28 blocks' attention/feed-forward Linears, ``caption_projection`` (linear_1, linear_2)
    and ``proj_out``; LoRaD r=128 on PixArt-XL-2-256 gives the paper's 81.22 M.
    """
    return not name.startswith("adaln_single.")


def dit_student_adaln(name: str) -> bool:
    """Every ``nn.Linear`` of a PixArtTransformer2DModel, the three ``adaln_single`` Linears included.

    The official training code's set (train_dkd_dit.py hooks every Linear): LoRaD r=128 on
    PixArt-XL-2-256 gives 82.56 M, where the paper's table (``dit_student``) says 81.22 M.
    """
    return True


def dit_fake(name: str) -> bool:
    """The Linears inside ``transformer_blocks`` (the fake score set for PixArt)."""
    return name.startswith("transformer_blocks.")


def mmdit_student(name: str) -> bool:
    """Every ``nn.Linear`` of an SD3Transformer2DModel except the ``time_text_embed`` MLPs (timestep and
    pooled text): the DiT student rule (``dit_student`` leaves out ``adaln_single``) on the joint blocks.

    That is, in each of the joint ``transformer_blocks``: attention ``to_q/k/v``, ``to_out.0`` (image
    stream), ``add_q/k/v_proj``, ``to_add_out`` (text stream), ``ff`` and ``ff_context``, and the
    per-block adaLN-Zero modulations ``norm1.linear`` / ``norm1_context.linear`` (PixArt's per-block
    modulation is a table, not a Linear: in MMDiT it is where each block reads the noise level, which a
    one-step student evaluated at sigma = 1 must re-purpose); plus ``context_embedder``, ``norm_out.linear``
    and ``proj_out`` (as PixArt's ``caption_projection`` and ``proj_out``).
    """
    return not name.startswith("time_text_embed.")


def mmdit_fake(name: str) -> bool:
    """The Linears inside ``transformer_blocks`` of an SD3Transformer2DModel (the ``dit_fake`` rule)."""
    return name.startswith("transformer_blocks.")


PRESETS: dict[str, Callable[[str], bool]] = {
    "unet_student": unet_student,
    "unet_fake": unet_fake,
    "dit_student": dit_student,
    "dit_student_adaln": dit_student_adaln,
    "dit_fake": dit_fake,
    "mmdit_student": mmdit_student,
    "mmdit_fake": mmdit_fake,
}


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n}


def resolve_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` selected by ``targets``.

    ``targets`` is a preset name (``unet_student``, ``unet_fake``, ``dit_student``, ``dit_student_adaln``, ``dit_fake``), a
    compiled regex or a string ``"re:<pattern>"`` (``re.fullmatch`` on module names), or a list of
    module names. Raises ``ValueError`` when nothing matches or a listed name is not a Linear.
    """
    linears = _linears(model)
    if isinstance(targets, re.Pattern) or (isinstance(targets, str) and targets.startswith("re:")):
        pattern = targets if isinstance(targets, re.Pattern) else re.compile(targets[3:])
        names = [n for n in linears if pattern.fullmatch(n)]
        what = f"regex {pattern.pattern!r}"
    elif isinstance(targets, str):
        if targets not in PRESETS:
            raise ValueError(
                f"unknown target preset {targets!r}; use one of {sorted(PRESETS)}, a list of module "
                f"names, or a regex as re.compile(...) or 're:<pattern>'")
        names = [n for n in linears if PRESETS[targets](n)]
        what = f"preset {targets!r}"
    else:
        names = list(dict.fromkeys(targets))
        bad = [n for n in names if n not in linears]
        if bad:
            raise ValueError(f"these target modules are not nn.Linear layers of the model: {bad[:5]}"
                             f"{' ...' if len(bad) > 5 else ''}")
        what = "the given module list"
    if not names:
        raise ValueError(f"{what} matched no nn.Linear of this {type(model).__name__}; "
                         f"check the model type (UNet presets: unet_*, PixArt: dit_*) or the names")
    return names
