"""The compression stages: one file per stage, plus the targeting and calibration they share.

Registering a stage here (one line) makes it a `RiverOneConfig` field, a quantizer step and a part of
`model.dequantize()`; the order of registration is the order of application: MiniViT shares vision
blocks first, VQC then swaps the Linears it targets (it wins over AQLM for a Linear both would take),
AQLM last.
"""

from ..config import register_stage
from .aqlm import AqlmSpec, AqlmStage, ModuleOverride
from .calibration_data import CalibrationSpec
from .minivit import MiniViTSpec, MiniViTStage, MiniViTTransform
from .vqc import VqcInit, VqcSpec, VqcStage

register_stage(MiniViTStage())
register_stage(VqcStage())
register_stage(AqlmStage())

__all__ = [
    "AqlmSpec", "AqlmStage", "CalibrationSpec", "MiniViTSpec", "MiniViTStage", "MiniViTTransform", "ModuleOverride",
    "VqcInit", "VqcSpec", "VqcStage",
]
