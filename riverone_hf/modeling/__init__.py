"""nn.Modules the compression stages put into a model."""

from .aqlm_linear import AqlmLinear

__all__ = ["AqlmLinear", "VQCGeneratedLinear"]

# Loaded on first access, so that `import riverone_hf` never imports the VQC code (PennyLane is needed
# when a VQCGeneratedLinear is constructed).
_LAZY = {"VQCGeneratedLinear": ".vqc_linear"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
