"""riverone_hf: compress vision-language models with ordinary transformers code.

Importing this package registers quant_method ``"riverone"`` with transformers, so
``from_pretrained(..., quantization_config=RiverOneConfig(...))`` compresses while loading and a saved
riverone checkpoint reloads with ``from_pretrained(path)``. Without this import, transformers only warns
about the unknown quant_method and loads random weights: always ``import riverone_hf`` first.
"""

from transformers.quantizers import auto as _auto

from .aq import AqSettings, QuantizedWeight, quantize_weight
from .config import QUANT_METHOD, RiverOneConfig, Stage, StagePlan, register_stage, registered_stages
from .modeling.aqlm_linear import AqlmLinear
from .quantizers.hf_quantizer import RiverOneHfQuantizer, add_stages
from .stages import AqlmSpec, CalibrationSpec, MiniViTSpec, ModuleOverride, VqcSpec

__version__ = "0.1.0"


def _register(mapping: dict, register, cls) -> None:
    """Register `cls` under QUANT_METHOD once; a re-import or reload replaces our own earlier entry."""
    existing = mapping.get(QUANT_METHOD)
    if existing is None:
        register(QUANT_METHOD)(cls)
    elif existing.__module__ == cls.__module__ and existing.__qualname__ == cls.__qualname__:
        mapping[QUANT_METHOD] = cls
    else:
        raise RuntimeError(
            f"quant_method {QUANT_METHOD!r} is already registered by {existing.__module__}.{existing.__qualname__}"
        )


_register(_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, _auto.register_quantization_config, RiverOneConfig)
_register(_auto.AUTO_QUANTIZER_MAPPING, _auto.register_quantizer, RiverOneHfQuantizer)

__all__ = [
    "AqSettings",
    "AqlmLinear",
    "AqlmSpec",
    "CalibrationSpec",
    "MiniViTSpec",
    "ModuleOverride",
    "QuantizedWeight",
    "RiverOneConfig",
    "RiverOneHfQuantizer",
    "Stage",
    "StagePlan",
    "VqcSpec",
    "add_stages",
    "quantize_weight",
    "register_stage",
    "registered_stages",
]
