"""`PVTrainer`: PV-Tuning on the plain `transformers.Trainer` machinery.

Overrides only documented hooks: `create_optimizer` (wraps the P-step optimizer in `PVOptimizer`, whose `step()`
runs the P-step then the V-step), `compute_loss` (KL to the teacher and/or cross-entropy) and `training_step`
(fixes the held-out monotonicity batch on the first call). Logging, checkpointing (the proxies and their moments
are in the optimizer's state dict), gradient accumulation, evaluation and DDP come from `Trainer`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback

from .config import PVTrainingArguments
from .vstep import PVOptimizer

_PHASES = ("before", "after_p", "after_v")


def _vocab_size(model: nn.Module) -> int:
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return config.vocab_size


def _check_v_step_every_against_checkpoints(config, args: PVTrainingArguments) -> None:
    """With several processes, a checkpoint must fall on a V-step when `v_step_every` > 1: the gradients accumulated
    since the last V-step are per process until it all-reduces them, and only the main process saves."""
    k = config.v_step_every if config.v_step else 1
    if k == 1 or args.world_size == 1 or args.save_strategy == "no":
        return
    if args.save_strategy != "steps" or args.save_steps % k:
        raise ValueError(f"`v_step_every` ({k}) with {args.world_size} processes needs `save_strategy` 'steps' (or "
                         f"'no') with `save_steps` a multiple of it, got save_strategy {str(args.save_strategy)!r}, "
                         f"save_steps {args.save_steps}")


class _MonotonicitySummary(TrainerCallback):
    def __init__(self, trainer: PVTrainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        summary = self.trainer.monotonicity_summary()
        if summary["measured_steps"]:
            state.log_history.append({"step": state.global_step, **{f"pv/{k}": v for k, v in summary.items()}})


class PVTrainer(Trainer):
    """Trainer for a model prepared by `get_pv_model`; `teacher_model` (optional) gives the KL targets."""

    def __init__(self, model=None, args: PVTrainingArguments | None = None, teacher_model: nn.Module | None = None,
                 **kwargs):
        if model is None or getattr(model, "pv_state", None) is None:
            raise ValueError("`model` must be prepared with get_pv_model(model, PVTuningConfig(...)) first")
        if args is None:
            raise ValueError("`args` (PVTrainingArguments) is required")
        if not isinstance(args, PVTrainingArguments):
            raise ValueError(f"`args` must be PVTrainingArguments, got {type(args).__name__}")
        self.kl_weight, self.ce_weight = args.loss_weights(teacher_model is not None)
        if teacher_model is not None and _vocab_size(teacher_model) != _vocab_size(model):
            raise ValueError(
                f"`teacher_model` vocabulary ({_vocab_size(teacher_model)}) differs from the student's "
                f"({_vocab_size(model)}): distil from the dense model the student was quantized from"
            )
        _check_v_step_every_against_checkpoints(model.pv_state.config, args)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher_model = None
        if teacher_model is not None:
            teacher_model.requires_grad_(False)
            self.teacher_model = teacher_model.to(self.args.device).eval()
        self.pv_optimizer: PVOptimizer | None = None
        self.monotonicity: list[dict[str, float]] = []
        self._monitor_batch = None
        self._pending: dict[str, float] = {}
        self.add_callback(_MonotonicitySummary(self))

    # -- hooks ---------------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        if self.optimizer is None or not isinstance(self.optimizer, PVOptimizer):
            super().create_optimizer(model)
            opt_model = self.model if model is None else model
            self.optimizer = self.pv_optimizer = PVOptimizer(self.optimizer, opt_model.pv_state)
            self.pv_optimizer.monitor = self._monitor
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._monitor_batch is None and self.args.monotonicity_every:
            self._monitor_batch = self._held_out_batch(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("PVTrainer needs `labels` in every batch (-100 marks positions without a loss)")
        ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = self.ce_weight * ce if self.ce_weight else 0.0
        if self.kl_weight:
            kl_sum, count = self._kl_sum(outputs.logits, inputs)
            if num_items_in_batch is not None and self.model_accepts_loss_kwargs:
                # the convention `Trainer` applies to the model's own (CE) loss, so both terms scale alike
                kl = kl_sum / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    kl = kl * self.accelerator.num_processes
            else:
                kl = kl_sum / count.clamp_min(1)
            loss = loss + self.kl_weight * kl
        return (loss, outputs) if return_outputs else loss

    # -- loss ----------------------------------------------------------------------------------------------------

    @staticmethod
    def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ over masked positions of KL(softmax(teacher/T) || softmax(student/T)) · T², and the position count.

        Args: logits [..., vocab] (fp32 math), mask [...] bool."""
        log_s = F.log_softmax(student_logits.float() / temperature, -1)
        log_t = F.log_softmax(teacher_logits.float() / temperature, -1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
        mask = mask.to(kl.dtype)
        return (kl * mask).sum() * temperature**2, mask.sum()

    def _kl_sum(self, student_logits: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad():
            teacher_logits = self.teacher_model(**teacher_inputs).logits
        labels = inputs["labels"]
        # logits at position t predict token t+1: the positions whose next label counts
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        return self.kl_divergence(student_logits, teacher_logits, mask, self.args.temperature)

    def objective(self, model: nn.Module, inputs: dict) -> float:
        """The training loss (per-position means, no scaling) on `inputs`, under no_grad in eval mode."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                outputs = model(**inputs)
                loss = self.ce_weight * outputs.loss if self.ce_weight else 0.0
                if self.kl_weight:
                    kl_sum, count = self._kl_sum(outputs.logits, inputs)
                    loss = loss + self.kl_weight * kl_sum / count.clamp_min(1)
        finally:
            model.train(was_training)
        return float(loss)

    # -- monotonicity ----------------------------------------------------------------------------------------------

    def _held_out_batch(self, train_inputs: dict) -> dict:
        """A fixed batch: the first eval batch when an eval set is given, else the first training batch."""
        if self.eval_dataset is not None and not isinstance(self.eval_dataset, dict):
            batch = next(iter(self.get_eval_dataloader()))
        else:
            batch = train_inputs
        return {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v))
                for k, v in self._prepare_inputs(batch).items()}

    def _monitor(self, phase: str) -> None:
        every = self.args.monotonicity_every
        # global_step is incremented after the optimizer step: this is optimizer step global_step + 1
        step = self.state.global_step + 1
        if not every or self._monitor_batch is None or step % every:
            return
        if self.pv_optimizer.config.v_step and not self.pv_optimizer.v_step_due(step):
            return  # with v_step_every > 1, only steps that run a V-step are measured
        self._pending[phase] = self.objective(self.model, self._monitor_batch)
        if phase == "after_v":
            record = {"step": step, **{p: self._pending[p] for p in _PHASES}}
            record["codes_changed"] = int(sum(self.pv_optimizer.last_changed.values()))
            self.monotonicity.append(record)
            self._pending = {}
            self.log({f"pv/loss_{p}": record[p] for p in _PHASES} | {"pv/codes_changed": record["codes_changed"]})

    def monotonicity_summary(self) -> dict:
        """How often each step lowered the held-out loss (fractions of the measured steps) + the raw records."""
        records = self.monotonicity
        n = len(records)
        p_lowered = sum(r["after_p"] < r["before"] for r in records)
        v_lowered = sum(r["after_v"] < r["after_p"] for r in records)
        v_not_raised = sum(r["after_v"] <= r["after_p"] for r in records)
        both = sum(r["after_v"] < r["before"] for r in records)
        return {
            "measured_steps": n,
            "p_step_lowered_fraction": p_lowered / n if n else None,
            "v_step_lowered_fraction": v_lowered / n if n else None,
            "v_step_not_raised_fraction": v_not_raised / n if n else None,
            "pv_step_lowered_fraction": both / n if n else None,
        }
