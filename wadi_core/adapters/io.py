"""Adapter weights as safetensors (local path or s3:// URI), with kind/rank/targets as metadata."""

from __future__ import annotations

import json
import os

from torch import nn

from .. import storage
from .model import adapter_info, adapter_names, adapter_state_dict, add_adapter, load_adapter_state_dict

__all__ = ["save_adapter", "load_adapter"]

FORMAT = "wadi-adapter-v1"


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Write adapter ``name`` to a ``.safetensors`` file (local or s3://)."""
    from safetensors.torch import save

    info = adapter_info(model, name)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    meta = {"format": FORMAT, "kind": info["kind"], "rank": str(info["rank"]),
            "options": json.dumps(info["options"]), "targets": json.dumps(info["targets"])}
    storage.write_bytes(str(path), save(state, metadata=meta))


def load_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> nn.Module:
    """Load a file written by ``save_adapter`` into adapter ``name``.

    If the model has no adapter ``name`` yet, it is added first with the saved kind, rank and targets.
    """
    from safetensors.torch import load

    data = storage.read_bytes(str(path))
    state = load(data)
    meta = _metadata(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a WaDi adapter file (metadata format={meta.get('format')!r})")
    if name not in adapter_names(model):
        add_adapter(model, meta["kind"], name, int(meta["rank"]), json.loads(meta["targets"]),
                    **json.loads(meta.get("options", "{}")))
    else:
        info = adapter_info(model, name)
        if info["kind"] != meta["kind"]:
            raise ValueError(f"{path} holds a {meta['kind']!r} adapter but {name!r} is {info['kind']!r}")
    ref = next(iter(adapter_state_dict(model, name).values()))
    load_adapter_state_dict(model, name, {k: v.to(ref.device) for k, v in state.items()})
    return model


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` header of a safetensors blob."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__", {}) or {}
