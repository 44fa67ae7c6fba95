"""nn.Modules the compression stages put into a model."""

from .aqlm_linear import AqlmLinear

__all__ = ["AqlmLinear"]
