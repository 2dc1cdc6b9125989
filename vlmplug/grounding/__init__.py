"""Attention-map grounding: `ground()` and its `Grounding` result; ViCrop and CARVE pipelines build on it."""
from .core import GENERIC_PROMPT, METHODS, ground, ground_inputs
from .result import Grounding, Region

__all__ = ["ground", "ground_inputs", "Grounding", "Region", "METHODS", "GENERIC_PROMPT"]
