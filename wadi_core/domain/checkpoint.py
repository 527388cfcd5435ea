"""Training-state checkpoints in safetensors + json (no pickle): weights, optimizer, step, RNG."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_training_state", "load_training_state", "optimizer_to_flat", "optimizer_from_flat"]


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and json-able metadata."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(
    state_dir: str | os.PathLike,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator | dict[str, torch.Generator],
    meta: dict[str, Any],
) -> None:
    """Atomically (write to a temp dir, then rename) save everything needed to resume exactly."""
    final = Path(state_dir)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {f"{name}.{k}": v.detach().contiguous().clone() for name, m in models.items() for k, v in m.state_dict().items()}
    save_file(weights, str(tmp / "models.safetensors"))
    opt_meta: dict[str, Any] = {}
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    gens = generator if isinstance(generator, dict) else {"generator": generator}
    save_file({"torch_cpu": torch.get_rng_state(), **{k: g.get_state() for k, g in gens.items()}},
              str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"meta": meta, "optimizer": opt_meta}, indent=1))
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(
    state_dir: str | os.PathLike,
    models: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator | dict[str, torch.Generator],
) -> dict[str, Any]:
    """Restore what ``save_training_state`` wrote into the given objects; returns ``meta``.

    Generators (one, or a dict by name) whose state is not in the checkpoint are left as they are.
    """
    d = Path(state_dir)
    info = json.loads((d / "state.json").read_text())
    weights = load_file(str(d / "models.safetensors"))
    for name, m in models.items():
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        m.load_state_dict(sub)
    if optimizer is not None and (d / "optimizer.safetensors").exists():
        optimizer_from_flat(optimizer, load_file(str(d / "optimizer.safetensors")), info["optimizer"])
    rng = load_file(str(d / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    gens = generator if isinstance(generator, dict) else {"generator": generator}
    for name, g in gens.items():
        if name in rng:
            g.set_state(rng[name])
    return info["meta"]
