"""Training state for exact resume (step, RNG, optimizers, adapters, data position).

Kept apart from the exported model: ``<dir>/train_state.json`` (structure and scalars) and
``<dir>/train_state.safetensors`` (every tensor). No pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = ["TrainState", "capture_train_state", "restore_train_state", "IncompatibleCheckpoint", "model_fingerprint",
           "check_fingerprint", "distiller_fingerprint"]

_JSON, _TENSORS = "train_state.json", "train_state.safetensors"


def _encode(obj: Any, tensors: dict[str, Tensor], path: str) -> Any:
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, Mapping):  # keys keep their type (optimizer state uses int keys)
        return {"__dict__": [[k, _encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a TrainState")


def _decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int = 0
    data_position: int = 0
    rng: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        body = {
            "step": self.step, "data_position": self.data_position,
            "rng": _encode(self.rng, tensors, "rng"), "adapters": _encode(self.adapters, tensors, "adapters"),
            "optimizers": _encode(self.optimizers, tensors, "optimizers"), "meta": self.meta,
        }
        # Write tensors first and the json last: a state dir with a json is complete.
        save_file(tensors, str(out / _TENSORS))
        tmp = out / (_JSON + ".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(out / _JSON)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TrainState":
        d = Path(directory)
        if not (d / _JSON).exists():
            raise FileNotFoundError(f"no {_JSON} in {d}: not a (complete) training state directory")
        body = json.loads((d / _JSON).read_text())
        tensors = load_file(str(d / _TENSORS))
        return cls(step=body["step"], data_position=body["data_position"],
                   rng=_decode(body["rng"], tensors), adapters=_decode(body["adapters"], tensors),
                   optimizers=_decode(body["optimizers"], tensors), meta=body.get("meta", {}))

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        return (Path(directory) / _JSON).exists()


class IncompatibleCheckpoint(RuntimeError):
    """A training state written for another teacher or other adapters than this run's."""


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def model_fingerprint(teacher_source: str, denoiser: nn.Module, roles: Mapping[str, nn.Module]) -> dict[str, str]:
    """What a training state belongs to: the teacher (its source, its parameter shapes and the
    bytes of its first weight tensor, which a retrained teacher changes) and, per role, the names
    and shapes of the trainable adapter tensors. Cheap (no pass over all the weights)."""
    params = list(denoiser.named_parameters())
    first = params[0][1].detach().to("cpu", torch.float32).contiguous() if params else torch.zeros(0)
    teacher = _digest([teacher_source] + [f"{n}:{tuple(p.shape)}" for n, p in params]
                      + [hashlib.sha256(first.numpy().tobytes()).hexdigest()])
    out = {"teacher": teacher}
    for role, module in roles.items():
        out[role] = _digest([f"{n}:{tuple(p.shape)}" for n, p in module.named_parameters()])
    return out


def distiller_fingerprint(distiller: Any) -> dict[str, str]:
    """``model_fingerprint`` of a ``WaDiDistiller`` (teacher + student and fake adapters)."""
    return model_fingerprint(str(distiller.teacher.source), distiller.denoiser,
                             {role: distiller.modules(role) for role in ("student", "fake")})


def check_fingerprint(saved: Mapping[str, str], current: Mapping[str, str], where: str,
                      advice: str = "start a new output directory, or delete the old state to start over.") -> None:
    """Raise :class:`IncompatibleCheckpoint` when a training state belongs to another model."""
    if not saved:  # written before fingerprints existed: nothing to compare
        return
    diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if diff:
        raise IncompatibleCheckpoint(
            f"checkpoint {where} was written for another {' / '.join(diff)} than this run's "
            f"(the teacher or the adapter config changed since): {advice}")


def capture_train_state(distiller: Any, updaters: Mapping[str, Any], generator: torch.Generator,
                        step: int, data_position: int, meta: dict[str, Any] | None = None) -> TrainState:
    """Snapshot adapters ("student", "fake"), updater state_dicts and all RNGs."""
    from wadi_core.adapters import adapter_state_dict

    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
                           "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return TrainState(
        step=step, data_position=data_position, rng=rng,
        adapters={name: adapter_state_dict(distiller.denoiser, name) for name in ("student", "fake")},
        optimizers={name: u.state_dict() for name, u in updaters.items() if hasattr(u, "state_dict")},
        meta={**(meta or {}), "fingerprint": distiller_fingerprint(distiller)},
    )


def restore_train_state(state: TrainState, distiller: Any, updaters: Mapping[str, Any],
                        generator: torch.Generator) -> None:
    """Inverse of :func:`capture_train_state` (adapters, optimizers, RNGs); refuses a state written
    for another teacher or other adapters (:class:`IncompatibleCheckpoint`) before touching anything."""
    from wadi_core.adapters import load_adapter_state_dict

    check_fingerprint(state.meta.get("fingerprint", {}), distiller_fingerprint(distiller), f"at step {state.step}")

    for name, sd in state.adapters.items():
        load_adapter_state_dict(distiller.denoiser, name, sd)
    for name, u in updaters.items():
        if name in state.optimizers:
            u.load_state_dict(state.optimizers[name])
    torch.set_rng_state(state.rng["torch"])
    generator.set_state(state.rng["generator"])
    py = state.rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state.rng["cuda"]))
