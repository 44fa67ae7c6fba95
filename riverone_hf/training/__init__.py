"""Trainers that recover accuracy after compression (MiniViT distillation; PV-Tuning later)."""

from .distill import DistillConfig, DistillLosses, DistillResult, distill_minivit, evaluate_distillation

__all__ = ["DistillConfig", "DistillLosses", "DistillResult", "distill_minivit", "evaluate_distillation"]
