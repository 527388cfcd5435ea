"""What an adapter is, as configuration: kind, rank, layer set; and the one call that applies it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from .base import adapter_class, check_rank
from .model import add_adapter
from .targets import resolve_targets

__all__ = ["AdapterKind", "AdapterSpec", "PRESET_TARGETS", "Role", "apply_adapter"]

AdapterKind = Literal["lorad", "lora", "dora", "full"]
Role = Literal["student", "fake"]

DEFAULT_RANK = 256  # the paper's student rank for SD

#: Paper layer sets per teacher family: (student preset, fake-score preset), see ``targets.PRESETS``.
PRESET_TARGETS: dict[str, tuple[str, str]] = {
    "sd": ("unet_student", "unet_fake"),
    "pixart": ("dit_student", "dit_fake"),
    "sdxl": ("unet_student", "unet_fake"),
    "sd3": ("mmdit_student", "mmdit_fake"),  # the DiT rules on SD3's joint blocks (targets.mmdit_student)  # the SD UNet rules; SDXL's add_embedding is outside the blocks
}


@dataclass(frozen=True)
class AdapterSpec:
    """One named adapter on the shared denoiser.

    ``rank``: the low rank of ``lorad`` / ``lora`` / ``dora`` (>= 1, default 256); ``full`` has none
    (0, the default for it).
    ``targets``: "auto" (the paper's preset for the teacher family and role), a preset name, or a
    regex ``re:<pattern>`` of module names (see ``wadi_core.adapters.targets``).
    """

    kind: AdapterKind = "lorad"  # adapter kind: lorad (rotation of weight rows), lora, dora or full
    rank: int | None = None  # low rank of lorad / lora / dora (default 256; full: none)
    targets: str = "auto"  # layer set: auto (the paper's preset for the family and role), a preset name, or re:<regex>

    def __post_init__(self) -> None:
        if self.rank is None:  # unknown kinds fail here, with the list of known ones
            object.__setattr__(self, "rank", DEFAULT_RANK if adapter_class(self.kind).uses_rank else 0)
        check_rank(self.kind, self.rank)

    def resolved_targets(self, family: str, role: Role) -> str:
        """The layer set for ``role`` on a ``family`` ("sd" / "pixart") denoiser."""
        if self.targets != "auto":
            return self.targets
        if family not in PRESET_TARGETS:
            raise ValueError(f"no preset layer set for family {family!r}; set targets explicitly")
        return PRESET_TARGETS[family][0 if role == "student" else 1]


def apply_adapter(model: nn.Module, spec: AdapterSpec, role: Role, family: str, *, name: str | None = None,
                  **kwargs) -> list[str]:
    """Add ``spec`` to ``model`` as adapter ``name`` (default: the role) on the role's layer set.

    Returns the adapted module names. ``kwargs`` go to ``add_adapter`` (``dtype``, ``freeze_base``).
    """
    targets = spec.resolved_targets(family, role)
    add_adapter(model, spec.kind, name or role, spec.rank, targets, **kwargs)
    return resolve_targets(model, targets)
