"""The embedded procedural text-to-image domain: attributes, captions, renders, evaluator.

Heavy pieces (torch models, diffusers) are imported lazily by their own modules.
"""

from wadi_core.domain.attributes import (ALL_COMBOS, ATTRIBUTE_NAMES, ATTRIBUTE_VALUES, COLOURS, HELDOUT_COMBOS,
                                         POSITIONS, SHAPES, SIZES, TRAIN_COMBOS, Attributes, caption, eval_prompts,
                                         find_attributes, parse_caption, sample_attributes, train_prompts)
from wadi_core.domain.render import render, render_batch, render_with_mask

#: The embedded teacher's sampling recipe (25 DDIM steps, CFG 3): its evaluations, baselines and
#: the VSD guidance of recipes/embedded.yaml use these (the YAML restates them for readers).
TEACHER_STEPS = 25
TEACHER_GUIDANCE = 3.0

__all__ = [
    "ALL_COMBOS", "ATTRIBUTE_NAMES", "ATTRIBUTE_VALUES", "COLOURS", "HELDOUT_COMBOS", "POSITIONS", "SHAPES", "SIZES",
    "TRAIN_COMBOS", "Attributes", "caption", "eval_prompts", "find_attributes", "parse_caption", "sample_attributes",
    "train_prompts", "TEACHER_STEPS", "TEACHER_GUIDANCE", "render", "render_batch", "render_with_mask", "load_domain_evaluator", "DomainEvaluator",
]


def __getattr__(name: str):
    # Lazy: importing the domain should not import torch.
    if name in ("load_domain_evaluator", "DomainEvaluator"):
        from wadi_core.domain import evaluator  # noqa: PLC0415 -- importing the domain must not import torch

        return getattr(evaluator, name)
    raise AttributeError(f"module 'wadi_core.domain' has no attribute {name!r}")
