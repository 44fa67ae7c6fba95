"""The AQ engine: additive quantization of one weight matrix in pure torch (no transformers import)."""

from .engine import quantize_weight, relative_output_error
from .layout import QuantizedWeight

__all__ = ["QuantizedWeight", "quantize_weight", "relative_output_error"]
