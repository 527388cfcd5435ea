"""Model-level adapter API: add, switch, merge, save/load, count (names fixed by ARCHITECTURE.md)."""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator

import torch
from torch import nn

from .base import adapter_class, check_rank
from .layer import AdaptedLinear
from .targets import Targets, resolve_targets

__all__ = [
    "add_adapter", "set_adapter", "use_adapter", "active_adapter", "merge_adapter", "unmerge_adapter",
    "adapter_state_dict", "load_adapter_state_dict", "adapter_parameters", "adapter_modules",
    "count_trainable", "remove_adapters", "adapter_names", "adapted_layers", "adapter_info",
]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def adapted_layers(model: nn.Module, name: str | None = None) -> dict[str, AdaptedLinear]:
    """``{module name: AdaptedLinear}`` of the model, optionally only layers carrying adapter ``name``."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, AdaptedLinear) and (name is None or name in m.adapters)}


def adapter_names(model: nn.Module) -> list[str]:
    """All adapter names present on the model, in insertion order."""
    seen: dict[str, None] = {}
    for layer in adapted_layers(model).values():
        seen.update(dict.fromkeys(layer.adapters))
    return list(seen)


def _layers_of(model: nn.Module, name: str) -> dict[str, AdaptedLinear]:
    layers = adapted_layers(model, name)
    if not layers:
        raise KeyError(f"model has no adapter named {name!r}; present: {adapter_names(model)}")
    return layers


def add_adapter(model: nn.Module, kind: str, name: str, rank: int, targets: Targets,
                *, dtype: torch.dtype | None = None, freeze_base: bool = True, **options: Any) -> nn.Module:
    """Add adapter ``name`` of ``kind`` (``lorad``, ``lora``, ``dora``, ``full``) on the Linears selected
    by ``targets`` (preset, module names or regex; see ``resolve_targets``).

    Targeted ``nn.Linear`` layers are replaced in place by ``AdaptedLinear`` (same Parameters). With
    ``freeze_base`` every parameter that is not an adapter parameter gets ``requires_grad=False``
    (the base is shared by teacher, fake score and student). The new adapter is not activated:
    call ``set_adapter``/``use_adapter``. ``options`` go to the kind (e.g. ``alpha`` for LoRA/DoRA).
    Returns ``model``.
    """
    cls = adapter_class(kind)
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == "none":
        raise ValueError(f"adapter name must be a Python identifier other than 'none', got {name!r}")
    check_rank(kind, rank)
    if name in adapter_names(model):
        raise ValueError(f"model already has an adapter named {name!r}; pick another name "
                         "or remove_adapters(model) first")
    merged = {m.merged_adapter for m in adapted_layers(model).values()} - {None}
    if merged:
        raise RuntimeError(f"adapter {sorted(merged)[0]!r} is merged into this model; "
                           "unmerge it before adding adapters")
    names = resolve_targets(model, targets)
    for mod_name in names:
        layer = model.get_submodule(mod_name)
        if not isinstance(layer, AdaptedLinear):
            parent_name, _, child = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = AdaptedLinear(layer)
            setattr(parent, child, layer)
        try:
            layer.add(name, cls(layer, rank, dtype=dtype, **options))
        except ValueError as e:
            raise ValueError(f"{mod_name}: {e}") from None
    if freeze_base:
        adapter_ids = {id(p) for layer in adapted_layers(model).values() for p in layer.adapters.parameters()}
        for p in model.parameters():
            if id(p) not in adapter_ids:
                p.requires_grad_(False)
    return model


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Activate adapter ``name`` on every layer that has it (others run plain); ``None`` = plain base."""
    if name is not None:
        _layers_of(model, name)
    for layer in adapted_layers(model).values():
        layer.set_active(name)


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter name, or None when the model runs as the plain base."""
    active = {m.active_adapter for m in adapted_layers(model).values()} - {None}
    if len(active) > 1:  # only reachable by setting layers by hand
        raise RuntimeError(f"several adapters are active at once: {sorted(active)}; call set_adapter")
    return next(iter(active), None)


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """``with use_adapter(model, "fake"): ...`` activates ``name`` and restores the previous one on exit."""
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        yield model
    finally:
        set_adapter(model, previous)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Write adapter ``name`` into the base weights (inference then costs what the base costs).

    The adapter stays active; ``unmerge_adapter`` undoes it exactly (LoRaD: rotation by -Theta).
    """
    layers = _layers_of(model, name)
    with torch.no_grad():
        for layer in layers.values():
            layer.merge(name)
    for layer in adapted_layers(model).values():
        if name not in layer.adapters:
            layer.set_active(None)


def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Restore the base weights after ``merge_adapter(model, name)``."""
    with torch.no_grad():
        for layer in _layers_of(model, name).values():
            layer.unmerge(name)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable parameters of adapter ``name`` (what its optimizer should get)."""
    return list(adapter_modules(model, name).parameters())


def adapter_modules(model: nn.Module, name: str) -> nn.ModuleList:
    """A ModuleList of adapter ``name``'s per-layer modules; its ``parameters()`` are exactly the
    adapter's trainable parameters (wrap this in a DeepSpeed engine, not the whole model)."""
    return nn.ModuleList(layer.adapters[name] for layer in _layers_of(model, name).values())


def count_trainable(model: nn.Module, name: str | None = None) -> int:
    """Number of parameters of adapter ``name``; with ``None``, of all ``requires_grad`` parameters."""
    if name is None:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in adapter_parameters(model, name))


def adapter_info(model: nn.Module, name: str) -> dict[str, Any]:
    """``{"kind", "rank", "options", "targets"}`` of adapter ``name`` (saved as metadata)."""
    layers = _layers_of(model, name)
    first = next(iter(layers.values())).adapters[name]
    return {"kind": first.kind, "rank": first.rank, "options": first.options(), "targets": list(layers)}


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``{"<layer>.<param>": tensor}`` of adapter ``name`` (detached; keys independent of the name)."""
    out: dict[str, torch.Tensor] = {}
    for layer_name, layer in _layers_of(model, name).items():
        for pname, p in layer.adapters[name].named_parameters():
            out[f"{layer_name}.{pname}"] = p.detach()
    return out


def load_adapter_state_dict(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``adapter_state_dict``) into adapter ``name``; keys and shapes must match."""
    own = {}
    for layer_name, layer in _layers_of(model, name).items():
        for pname, p in layer.adapters[name].named_parameters():
            own[f"{layer_name}.{pname}"] = p
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"adapter state for {name!r} does not match the model: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it saved "
            "from the same architecture, targets and kind?")
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(p.shape)}" for k, p in own.items()
             if tuple(state[k].shape) != tuple(p.shape)]
    if wrong:
        raise ValueError(f"adapter state for {name!r} has wrong shapes (saved vs model), e.g. {wrong[:3]}; "
                         "was it saved with another rank?")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state[k])


def remove_adapters(model: nn.Module) -> nn.Module:
    """Replace every ``AdaptedLinear`` by a plain ``nn.Linear`` with the same (possibly merged) weights."""
    for mod_name, layer in list(adapted_layers(model).items()):
        parent_name, _, child = mod_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.to_linear())
    return model
