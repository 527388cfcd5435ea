"""Training state for exact resume: where the run is (step, data position, counters, what it
was trained for) and, for the single-process trainer, its tensors (adapters, optimizers, RNG).

One type for both trainers. ``wadi_core.local_train`` keeps everything in it; a Ray Train worker
(``pipelines.train.checkpoint``) keeps only the scalars here, because DeepSpeed's engines write the
sharded tensors. Kept apart from the exported model: ``<dir>/train_state.json`` (structure and
scalars) and ``<dir>/train_state.safetensors`` (every tensor, when there are any). No pickle.
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

from wadi_core.adapters import adapter_state_dict, load_adapter_state_dict

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
    """Everything needed to continue a run exactly where it stopped.

    ``data_position`` counts what was consumed of epoch ``epoch``'s prompt stream in the
    trainer's unit (the local trainer: prompts; a Ray worker: its own batches). ``meta`` holds
    trainer-specific records (the config, bad rows of finished epochs). The tensor fields stay
    empty when another writer owns the tensors (DeepSpeed engines).
    """

    step: int = 0
    epoch: int = 0
    data_position: int = 0
    prompts_seen: int = 0
    nonfinite_steps: int = 0        # VSD steps skipped for a non-finite loss / gradient
    fingerprint: dict[str, str] = field(default_factory=dict)  # what the state was trained for
    mlflow_run_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def scalars(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SCALARS}

    def save(self, directory: str | os.PathLike) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        body = {**self.scalars(), "rng": _encode(self.rng, tensors, "rng"),
                "adapters": _encode(self.adapters, tensors, "adapters"),
                "optimizers": _encode(self.optimizers, tensors, "optimizers")}
        # Write tensors first and the json last: a state dir with a json is complete.
        if tensors:
            save_file(tensors, str(out / _TENSORS))
        tmp = out / (_JSON + ".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(out / _JSON)
        return out

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        """The scalars of a ``train_state.json`` (tensor references are dropped)."""
        return cls._from_body(json.loads(text), {})

    @classmethod
    def _from_body(cls, body: dict[str, Any], tensors: dict[str, Tensor]) -> "TrainState":
        meta = dict(body.get("meta") or {})
        # States written before these were fields kept them in meta.
        fingerprint = body.get("fingerprint") or meta.pop("fingerprint", {})
        nonfinite = body.get("nonfinite_steps", meta.pop("nonfinite_steps", 0))
        scalars = {k: body[k] for k in _SCALARS if k in body and k not in ("meta", "fingerprint", "nonfinite_steps")}
        decoded = {k: _decode(body[k], tensors) for k in ("rng", "adapters", "optimizers") if k in body and tensors}
        return cls(**scalars, fingerprint=fingerprint, nonfinite_steps=int(nonfinite), meta=meta, **decoded)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TrainState":
        d = Path(directory)
        if not (d / _JSON).exists():
            raise FileNotFoundError(f"no {_JSON} in {d}: not a (complete) training state directory")
        body = json.loads((d / _JSON).read_text())
        tensors = load_file(str(d / _TENSORS)) if (d / _TENSORS).exists() else {}
        return cls._from_body(body, tensors)

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        return (Path(directory) / _JSON).exists()


_SCALARS = ("step", "epoch", "data_position", "prompts_seen", "nonfinite_steps", "fingerprint", "mlflow_run_id",
            "meta")


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
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
                           "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return TrainState(
        step=step, data_position=data_position, rng=rng, fingerprint=distiller_fingerprint(distiller),
        adapters={name: adapter_state_dict(distiller.denoiser, name) for name in ("student", "fake")},
        optimizers={name: u.state_dict() for name, u in updaters.items() if hasattr(u, "state_dict")},
        meta=dict(meta or {}),
    )


def restore_train_state(state: TrainState, distiller: Any, updaters: Mapping[str, Any],
                        generator: torch.Generator) -> None:
    """Inverse of :func:`capture_train_state` (adapters, optimizers, RNGs); refuses a state written
    for another teacher or other adapters (:class:`IncompatibleCheckpoint`) before touching anything."""
    check_fingerprint(state.fingerprint, distiller_fingerprint(distiller), f"at step {state.step}")

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
