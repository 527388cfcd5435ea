"""Evaluation metrics: FID statistics, precision/recall, and the extractor / scorer interfaces.

open_clip is imported only when a CLIP / HPS scorer is built.
"""

from wadi_core.metrics.clip import ClipScorer, HPSv2Scorer
from wadi_core.metrics.inception import InceptionExtractor
from wadi_core.metrics.coco import draw_coco_captions, prompt_list_sha256, read_prompt_list
from wadi_core.metrics.precision_recall import precision_recall
from wadi_core.metrics.protocol import (
    FeatureExtractor,
    PromptScorer,
    clean_resize,
    pils_to_tensor,
    protocol_resize,
    tensor_to_pils,
)
from wadi_core.metrics.stats import GaussianStats, frechet_distance

__all__ = [
    "GaussianStats",
    "frechet_distance",
    "precision_recall",
    "FeatureExtractor",
    "PromptScorer",
    "protocol_resize",
    "clean_resize",
    "tensor_to_pils",
    "pils_to_tensor",
    "InceptionExtractor",
    "ClipScorer",
    "HPSv2Scorer",
    "draw_coco_captions",
    "prompt_list_sha256",
    "read_prompt_list",
]

