"""Text encoding off the train workers (``data.text_encoding: actors``).

PixArt-alpha conditions on T5-XXL (4.76 B parameters, ~9.5 GB in bf16, ~19 GB in fp32): held by
every train worker it takes GPU memory that the denoiser, two adapters, their optimizer states
and activations need. With ``actors``, a Ray Data stage of its own actors (a callable class that
loads only the tokenizer and text encoder, once) turns each caption into its embedding (+ T5
attention mask; for SDXL the pooled embedding of its second CLIP too); Ray Data streams those rows to
the train workers, which load the teacher
without its text encoder. The empty prompt (classifier-free guidance) and the fixed sample
prompts are encoded once before training by the same actor class and handed to the workers in
``train_loop_config``.

Embeddings travel in ``data.encoder_dtype`` (bf16 as its raw 16-bit pattern: numpy has no bf16).
The default ``trainer`` keeps CLIP in the worker (SD: small next to the UNet, and ~236 KB of
floats per prompt through the object store is not worth it there).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wadi_core.models import Cond, load_prompt_encoder

if TYPE_CHECKING:
    import ray.data

    from wadi_core.models import Teacher

    from pipelines.config.job import DistillConfig

__all__ = ["EncodedPrompts", "TextEncoderActor", "encode_stage", "precompute_conds", "remember_conds",
           "batch_cond", "to_numpy", "to_tensor"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch converts each
    bf16 operand to fp32 and back, which is slower than fp32 itself."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU copy as numpy; bf16 as its uint16 bit pattern (numpy has no bfloat16)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """Inverse of ``to_numpy`` (uint16 arrays are bf16 bit patterns)."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@dataclass
class EncodedPrompts:
    """A train batch whose captions were encoded by the text-encoder actors."""

    captions: list[str]
    embeds: np.ndarray  # (B, L, D)
    mask: np.ndarray | None  # (B, L) for T5, None for CLIP
    pooled: np.ndarray | None = None  # (B, P) for SDXL (text_encoder_2's pooled embedding), else None

    def __len__(self) -> int:
        return len(self.captions)

    def cond(self, device: torch.device | str, dtype: torch.dtype) -> Cond:
        mask = None if self.mask is None else to_tensor(self.mask).to(device, torch.int64)
        pooled = None if self.pooled is None else to_tensor(self.pooled).to(device, dtype)
        return Cond(to_tensor(self.embeds).to(device, dtype), mask, pooled)

    @staticmethod
    def stack(rows: list[tuple]) -> "EncodedPrompts":
        """Rows ``(caption, embeds, mask)`` or ``(caption, embeds, mask, pooled)`` -> one batch."""
        masks = [r[2] for r in rows]
        pooled = [r[3] if len(r) > 3 else None for r in rows]
        return EncodedPrompts([r[0] for r in rows], np.stack([r[1] for r in rows]),
                              None if masks[0] is None else np.stack(masks),
                              None if pooled[0] is None else np.stack(pooled))


class TextEncoderActor:
    """Ray Data callable class: loads the teacher's tokenizer + text encoder once; adds ``embeds``
    (and ``mask`` for T5, ``pooled`` for SDXL) to rows ``caption``, ``bad``. Bad rows (dropped by the worker) get zeros.
    ``clip_mask``: CLIP runs with the attention mask (``vsd.prompt_encoding=official``, training prompts)."""

    def __init__(self, teacher: str, dtype: str = "float32", use_gpu: bool = False, clip_mask: bool = False):
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if device == "cpu" and dtype == "bfloat16" and not cpu_has_native_bf16():
            warnings.warn("data.encoder_dtype=bfloat16 on a CPU without AVX512-BF16 or AMX: torch emulates bf16 "
                          "there, slower than float32; use data.encoder_dtype=float32 on this CPU, or give the "
                          "encoder actors GPUs (data.encoder_gpus_per_actor)", stacklevel=2)
        self.encoder = load_prompt_encoder(teacher, DTYPES[dtype], device)
        self.clip_mask = clip_mask
        self.empty = self.encoder([""])  # shape and mask layout for batches without a good row

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(c) for c in batch["caption"]]
        good = [i for i, code in enumerate(batch["bad"]) if int(code) == 0]
        n, (_, length, dim) = len(captions), self.empty.embeds.shape
        embeds = np.zeros((n, length, dim), dtype=to_numpy(self.empty.embeds[:0]).dtype)
        out = {**batch, "embeds": embeds}
        cond = self.encoder([captions[i] for i in good], clip_mask=self.clip_mask) if good else None
        if cond is not None:
            embeds[good] = to_numpy(cond.embeds)
        if self.empty.mask is not None:
            mask = np.zeros((n, length), dtype=np.uint8)
            if cond is not None:
                mask[good] = cond.mask.cpu().numpy().astype(np.uint8)
            out["mask"] = mask
        if self.empty.pooled is not None:
            pooled = np.zeros((n, self.empty.pooled.shape[-1]), dtype=embeds.dtype)
            if cond is not None:
                pooled[good] = to_numpy(cond.pooled)
            out["pooled"] = pooled
        return out


def _actor_args(cfg: "DistillConfig", clip_mask: bool = False) -> dict[str, Any]:
    import ray.data  # noqa: PLC0415 -- Ray only on the cluster path

    d = cfg.data
    return dict(
        fn_constructor_kwargs={"teacher": cfg.teacher, "dtype": d.encoder_dtype,
                               "use_gpu": d.encoder_gpus_per_actor > 0, "clip_mask": clip_mask},
        compute=ray.data.ActorPoolStrategy(size=d.encoder_actors), batch_size=d.encoder_batch_size,
        num_cpus=d.encoder_cpus_per_actor, num_gpus=d.encoder_gpus_per_actor, batch_format="numpy",
    )


def encode_stage(ds: "ray.data.Dataset", cfg: "DistillConfig") -> "ray.data.Dataset":
    """``ds`` (rows ``caption``, ``bad``) + the text-encoder actor stage (rows gain ``embeds``, ``mask``);
    training prompts, so encoded as ``vsd.prompt_encoding`` says."""
    return ds.map_batches(TextEncoderActor, **_actor_args(cfg, clip_mask=cfg.vsd.prompt_encoding == "official"))


def precompute_conds(cfg: "DistillConfig", prompts: list[str]) -> dict[str, Any]:
    """Embeddings of a few fixed prompts (the empty prompt, the sample prompts), computed once by
    one text-encoder actor, as a picklable dict for ``train_loop_config``."""
    import ray.data  # noqa: PLC0415 -- Ray only on the cluster path

    rows = [{"idx": i, "caption": p, "bad": 0} for i, p in enumerate(prompts)]
    args = {**_actor_args(cfg), "compute": ray.data.ActorPoolStrategy(size=1)}
    out = sorted(ray.data.from_items(rows, override_num_blocks=1).map_batches(TextEncoderActor, **args).take_all(),
                 key=lambda r: int(r["idx"]))
    return {"prompts": [str(r["caption"]) for r in out], "embeds": np.stack([r["embeds"] for r in out]),
            "mask": np.stack([r["mask"] for r in out]) if "mask" in out[0] else None,
            "pooled": np.stack([r["pooled"] for r in out]) if "pooled" in out[0] else None}


def remember_conds(teacher: "Teacher", conds: dict[str, Any]) -> None:
    """Give a teacher loaded without its text encoder the precomputed prompts' conditionings."""
    encoded = EncodedPrompts(conds["prompts"], conds["embeds"], conds["mask"], conds.get("pooled"))
    teacher.remember(encoded.captions, encoded.cond(teacher.device, teacher.dtype))


def batch_cond(teacher: "Teacher", batch: "EncodedPrompts | list[str]") -> Cond:
    """The conditioning of a train batch: streamed embeddings, or the worker's own text encoder
    (as ``teacher.prompt_encoding`` says, set from ``vsd.prompt_encoding``)."""
    if isinstance(batch, EncodedPrompts):
        return batch.cond(teacher.device, teacher.dtype)
    return teacher.encode_train_prompts(batch)
