"""Read and write weights as diffusers model dirs, diffusers pipeline dirs or single .safetensors files.

A checkpoint is a local path (s3:// URIs are materialised by the caller with ``storage.materialize``):
- a ``.safetensors`` file;
- a diffusers model dir (``config.json`` + ``diffusion_pytorch_model.safetensors``, possibly sharded);
- a diffusers pipeline dir (or any dir without weights of its own): its ``unet/`` or ``transformer/`` is used.
Writing keeps the layout: same files, same key-to-shard assignment, same metadata, other files copied.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["WeightsCheckpoint", "locate_weights", "load_weights", "save_weights_like"]

_DENOISERS = ("unet", "transformer")
_PLAIN_NAME = re.compile(r"^[^.]+(-\d{5}-of-\d{5})?\.safetensors$")  # no ".fp16"-style variant


@dataclass(frozen=True)
class WeightsCheckpoint:
    """Where a checkpoint's weights live: ``root`` as given, ``model_dir`` holding ``files``."""

    root: Path
    model_dir: Path | None
    files: tuple[Path, ...]

    @property
    def is_file(self) -> bool:
        return self.model_dir is None


def locate_weights(path: str | Path) -> WeightsCheckpoint:
    """Find the safetensors files of a file / model dir / pipeline dir; clear error otherwise."""
    root = Path(path)
    if root.is_file():
        if root.suffix != ".safetensors":
            raise ValueError(f"{root} is not a .safetensors file (pickled checkpoints are not read)")
        return WeightsCheckpoint(root, None, (root,))
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist")
    model_dir = root
    if (root / "model_index.json").exists() or not any(root.glob("*.safetensors")):
        found = [root / d for d in _DENOISERS if (root / d).is_dir()]
        if len(found) != 1:
            raise FileNotFoundError(f"no .safetensors weights in {root} and no single unet/ or transformer/ "
                                    "folder; pass a diffusers model dir (e.g. .../unet), a pipeline dir or a file")
        model_dir = found[0]
    files = sorted(model_dir.glob("*.safetensors"))
    plain = [f for f in files if _PLAIN_NAME.match(f.name)]
    files = plain or files
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}; pass a diffusers model dir "
                                "(e.g. .../unet), a pipeline dir or a .safetensors file")
    return WeightsCheckpoint(root, model_dir, tuple(files))


def load_weights(ckpt: WeightsCheckpoint) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, on CPU, dtypes as stored."""
    state: dict[str, torch.Tensor] = {}
    for f in ckpt.files:
        part = load_file(str(f))
        dup = set(part) & set(state)
        if dup:
            raise ValueError(f"{f} repeats keys already read from another file, e.g. {sorted(dup)[:3]}")
        state.update(part)
    return state


def save_weights_like(ckpt: WeightsCheckpoint, state: Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """Write ``state`` at ``out`` in the layout of ``ckpt`` (file, model dir or pipeline dir)."""
    out = Path(out)
    if out.resolve() == ckpt.root.resolve():
        raise ValueError(f"refusing to overwrite the source checkpoint {ckpt.root}")
    if ckpt.is_file:
        out.parent.mkdir(parents=True, exist_ok=True)
        targets = {ckpt.files[0]: out}
    else:
        if out.exists():
            shutil.rmtree(out)
        weight_names = {f.name for f in ckpt.files}
        rel = ckpt.model_dir.relative_to(ckpt.root)
        shutil.copytree(ckpt.root, out, ignore=lambda d, names: [
            n for n in names if Path(d).resolve() == ckpt.model_dir.resolve() and n.endswith(".safetensors")
            and (n in weight_names or not _PLAIN_NAME.match(n))])  # drop stale variants (e.g. fp16) too
        targets = {f: out / rel / f.name for f in ckpt.files}
    written: set[str] = set()
    for src, dest in targets.items():
        with safe_open(str(src), framework="pt") as fh:
            keys, meta = list(fh.keys()), fh.metadata()
        save_file({k: state[k].contiguous() for k in keys}, str(dest), metadata=meta)
        written.update(keys)
    extra = set(state) - written
    if extra:
        raise ValueError(f"{len(extra)} tensors have no file in the source layout, e.g. {sorted(extra)[:3]}")
    return out
