"""Trainers that recover accuracy after compression (MiniViT distillation; PV-Tuning)."""

from .distill import DistillConfig, DistillLosses, DistillResult, distill_minivit, evaluate_distillation
from .pv import PVTrainer, PVTrainingArguments, PVTuningConfig, get_pv_model

__all__ = [
    "DistillConfig", "DistillLosses", "DistillResult", "PVTrainer", "PVTrainingArguments", "PVTuningConfig",
    "distill_minivit", "evaluate_distillation", "get_pv_model",
]
