"""The adapter file format: safetensors weights with kind / rank / targets (and more) as metadata.

One format, ``wadi-adapter-v1``, for every adapter file the project writes: ``save_adapter`` from a
model, ``save_adapter_file`` from a bare state dict (e.g. a DeepSpeed engine's, or the export's
``adapters/student.safetensors``). ``load_adapter`` puts either onto a model; ``load_adapter_file``
returns (state dict, ``AdapterSpec``) without a model. Paths may be local or ``s3://`` URIs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from safetensors.torch import load, save
from torch import Tensor, nn

from .. import storage
from .model import adapter_info, adapter_names, adapter_state_dict, add_adapter, load_adapter_state_dict
from .spec import AdapterSpec, Role

__all__ = ["FORMAT", "save_adapter", "load_adapter", "save_adapter_file", "load_adapter_file",
           "read_adapter_metadata"]

FORMAT = "wadi-adapter-v1"


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> None:
    """Write adapter ``name`` of ``model`` to a ``.safetensors`` file (local or s3://)."""
    info = adapter_info(model, name)
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    meta = {"format": FORMAT, "kind": info["kind"], "rank": str(info["rank"]),
            "options": json.dumps(info["options"]), "targets": json.dumps(info["targets"])}
    storage.write_bytes(str(path), save(state, metadata=meta))


def save_adapter_file(path: str | os.PathLike, state: Mapping[str, Tensor], spec: AdapterSpec, family: str,
                      role: Role = "student", student_alphabar: float | None = None) -> None:
    """Write a bare adapter state dict in the same format; family, role and (for a student) the ``a``
    of its one-step parametrisation x0 = (z - sqrt(1 - a) eps) / sqrt(a) go in the metadata."""
    meta = {"format": FORMAT, "kind": spec.kind, "rank": str(spec.rank), "options": "{}",
            "targets": json.dumps(spec.resolved_targets(family, role)), "family": family, "role": role}
    if student_alphabar is not None:
        meta["student_alphabar"] = repr(float(student_alphabar))
    if "://" not in str(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(str(path), save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=meta))


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an adapter file; a clear error when the file is not one."""
    return _checked(_metadata(storage.read_bytes(str(path))), path)


def load_adapter_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], AdapterSpec]:
    """(state dict, AdapterSpec) of an adapter file whose targets are a preset or a regex."""
    data = storage.read_bytes(str(path))
    meta = _checked(_metadata(data), path)
    targets = json.loads(meta["targets"])
    if not isinstance(targets, str):
        raise ValueError(f"{path} lists explicit layers: load it onto a model with wadi_core.adapters.load_adapter")
    return load(data), AdapterSpec(meta["kind"], int(meta["rank"]), targets)


def load_adapter(model: nn.Module, name: str, path: str | os.PathLike) -> dict[str, str]:
    """Load an adapter file into adapter ``name`` of ``model``; returns the file's metadata.

    If the model has no adapter ``name`` yet, it is added first with the saved kind, rank and targets.
    """
    data = storage.read_bytes(str(path))
    meta = _checked(_metadata(data), path)
    if name not in adapter_names(model):
        add_adapter(model, meta["kind"], name, int(meta["rank"]), json.loads(meta["targets"]),
                    **json.loads(meta.get("options", "{}")))
    elif adapter_info(model, name)["kind"] != meta["kind"]:
        raise ValueError(f"{path} holds a {meta['kind']!r} adapter but {name!r} is {adapter_info(model, name)['kind']!r}")
    ref = next(iter(adapter_state_dict(model, name).values()))
    load_adapter_state_dict(model, name, {k: v.to(ref.device) for k, v in load(data).items()})
    return meta


def _checked(meta: dict[str, str], path: str | os.PathLike) -> dict[str, str]:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a WaDi adapter file (metadata format={meta.get('format')!r}); "
                         "adapter files are written by wadi_core.adapters.save_adapter / save_adapter_file")
    return meta


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` header of a safetensors blob."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__", {}) or {}
