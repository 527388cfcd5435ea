"""PEFT-like adapters for WaDi: ``lorad`` (the paper's), ``lora``, ``dora``, ``full``, one registry.

Several named adapters can live on one model over a single frozen copy of the base weights;
``set_adapter(model, None)`` runs the plain base. See docs/ARCHITECTURE.md for the contract.
"""

from . import dora, full, lora, lorad  # noqa: F401  (register the kinds)
from .base import ADAPTER_KINDS, AdapterModule, adapter_class, check_rank, register_adapter
from .io import load_adapter, load_adapter_file, read_adapter_metadata, save_adapter, save_adapter_file
from .layer import AdaptedLinear
from .model import (active_adapter, adapted_layers, adapter_info, adapter_modules, adapter_names,
                    adapter_parameters, adapter_state_dict, add_adapter, count_trainable,
                    load_adapter_state_dict, merge_adapter, remove_adapters, set_adapter,
                    unmerge_adapter, use_adapter)
from .spec import PRESET_TARGETS, AdapterSpec, apply_adapter
from .targets import PRESETS, resolve_targets

__all__ = [
    "ADAPTER_KINDS", "AdapterModule", "AdaptedLinear", "AdapterSpec", "PRESETS", "PRESET_TARGETS", "apply_adapter",
    "check_rank", "load_adapter_file", "read_adapter_metadata", "save_adapter_file", "active_adapter", "adapted_layers",
    "adapter_class", "adapter_info", "adapter_modules", "adapter_names", "adapter_parameters",
    "adapter_state_dict", "add_adapter", "count_trainable", "load_adapter", "load_adapter_state_dict",
    "merge_adapter", "register_adapter", "remove_adapters", "resolve_targets", "save_adapter",
    "set_adapter", "unmerge_adapter", "use_adapter",
]
