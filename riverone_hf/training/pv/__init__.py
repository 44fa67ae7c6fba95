"""PV-Tuning (Malinovskii et al., NeurIPS 2024, arXiv 2405.14852): end-to-end tuning of AQLM models, alternating a
continuous P-step (codebooks, scales, norms, biases) and a discrete V-step (codes, by beam search)."""

from .config import PVTrainingArguments, PVTuningConfig
from .model import get_pv_model, print_trainable_parameters, trainable_parameter_summary
from .trainer import PVTrainer
from .vstep import PVOptimizer, PVState, reencode_groups

__all__ = [
    "PVOptimizer", "PVState", "PVTrainer", "PVTrainingArguments", "PVTuningConfig", "get_pv_model",
    "print_trainable_parameters", "reencode_groups", "trainable_parameter_summary",
]
