"""The AQ engine: additive quantization of one weight matrix in pure torch (no transformers import)."""

from .engine import quantize_weight, relative_output_error
from .layout import QuantizedWeight
from .settings import AqScheme, AqSettings, CodebookOptimizer

__all__ = ["AqScheme", "AqSettings", "CodebookOptimizer", "QuantizedWeight", "quantize_weight", "relative_output_error"]
