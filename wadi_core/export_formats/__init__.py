"""Other file formats for an exported student: one-file Stable Diffusion (LDM layout) and LoRA.

Pure torch + safetensors (no ray / mlflow); ``jobs/export.py`` is the command line.
"""

from .ldm import pipeline_to_ldm, save_single_file, text_encoder_layout
from .lora import LayerFit, lora_from_deltas, lorad_weight_deltas, save_lora_file

__all__ = ["pipeline_to_ldm", "save_single_file", "text_encoder_layout", "LayerFit", "lora_from_deltas",
           "lorad_weight_deltas", "save_lora_file"]
