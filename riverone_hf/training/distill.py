"""Distil the per-block parameters of a MiniViT-shared model (student) from the original model (teacher).

loss = prediction_weight * prediction + attention_weight * attention + hidden_weight * hidden, where
- prediction: on the final outputs. For an image classifier, T² · KL(softmax(teacher/T) ‖ softmax(student/T))
  of the logits; otherwise the vision tower's last hidden state, ‖student − teacher‖² / ‖teacher‖².
- attention: on every block of a shared group, Σ_keys (A_student − A_teacher)² of the attention maps
  (the student's after its head mixing; those maps may leave the simplex, so not a KL), averaged over
  blocks, images, heads and queries.
- hidden: on the output H [N, C] of every block of a shared group, KL between the teacher's and the
  student's token relations softmax(H Hᵀ / √C), averaged over blocks, images and queries.

Only the per-block parameters of the shared groups train (transforms, norms, layer-scales), plus the
shared attention/MLP weights when `train_shared`. The teacher's attention runs eagerly during
distillation (it must return its maps) and is put back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling.minivit import per_block_parameters, shared_groups, shared_parameters, use_eager_attention
from ..modeling.vision_blocks import VisionTower, find_vision_tower

logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Settings of `distill_minivit`.

    Args:
        steps (`int`, defaults to 200): optimisation steps (one batch each).
        lr (`float`, defaults to 1e-3): AdamW learning rate of the per-block parameters (cosine decay to 0).
        train_shared (`bool`, defaults to False): also train the shared attention/MLP weights.
        shared_lr (`float`, optional): learning rate of the shared weights; defaults to `lr`.
        weight_decay (`float`, defaults to 0.0): AdamW weight decay.
        prediction_weight, attention_weight, hidden_weight (`float`, defaults to 1.0, 1.0, 1.0): the
            weights of the three losses (0 switches one off).
        temperature (`float`, defaults to 1.0): softmax temperature of the logits' KL.
        max_grad_norm (`float`, defaults to 1.0): gradient clipping (0: none).
        log_every (`int`, defaults to 20): log the losses every this many steps.
    """

    steps: int = field(default=200, metadata={"help": "Optimisation steps, >= 1."})
    lr: float = field(default=1e-3, metadata={"help": "Learning rate of the per-block parameters, > 0."})
    train_shared: bool = field(default=False, metadata={"help": "Also train the shared attention/MLP weights."})
    shared_lr: float | None = field(default=None, metadata={"help": "Learning rate of the shared weights (default: lr)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay, >= 0."})
    prediction_weight: float = field(default=1.0, metadata={"help": "Weight of the prediction loss, >= 0."})
    attention_weight: float = field(default=1.0, metadata={"help": "Weight of the attention-map loss, >= 0."})
    hidden_weight: float = field(default=1.0, metadata={"help": "Weight of the hidden-state relation loss, >= 0."})
    temperature: float = field(default=1.0, metadata={"help": "Temperature of the logits' KL, > 0."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm, >= 0 (0: none)."})
    log_every: int = field(default=20, metadata={"help": "Log every this many steps, >= 1."})

    def __post_init__(self):
        checks = {
            "steps": isinstance(self.steps, int) and self.steps >= 1,
            "lr": self.lr > 0,
            "shared_lr": self.shared_lr is None or self.shared_lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "prediction_weight": self.prediction_weight >= 0,
            "attention_weight": self.attention_weight >= 0,
            "hidden_weight": self.hidden_weight >= 0,
            "temperature": self.temperature > 0,
            "max_grad_norm": self.max_grad_norm >= 0,
            "log_every": isinstance(self.log_every, int) and self.log_every >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"`{name}` has an invalid value {getattr(self, name)!r}; see DistillConfig's help")
        if self.prediction_weight + self.attention_weight + self.hidden_weight == 0:
            raise ValueError("all three loss weights are 0; set at least one of prediction/attention/hidden_weight")


@dataclass
class DistillLosses:
    """One evaluation of the loss: the weighted total and its three unweighted parts."""

    total: float
    prediction: float
    attention: float
    hidden: float


@dataclass
class DistillResult:
    history: list[DistillLosses]
    trained_parameters: int


class _Capture(contextlib.ExitStack):
    """Forward hooks that keep the attention maps and the outputs of the given blocks."""

    def __init__(self, tower: VisionTower, indices: list[int]):
        super().__init__()
        self.maps: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        for index in indices:
            self.callback(tower.attention(index).register_forward_hook(self._keep(self.maps, index, 1)).remove)
            self.callback(tower.blocks[index].register_forward_hook(self._keep(self.hidden, index, 0)).remove)

    @staticmethod
    def _keep(store: dict, index: int, position: int):
        def hook(module, args, output):
            store[index] = output[position] if isinstance(output, (tuple, list)) else output

        return hook


@contextlib.contextmanager
def _eager(tower: VisionTower, indices: list[int]):
    """Run the attention of these blocks with the eager (map-returning) implementation, then restore it."""
    saved = [(tower.attention(i), tower.attention(i).config) for i in indices]
    for attention, _ in saved:
        use_eager_attention(attention)
    try:
        yield
    finally:
        for attention, config in saved:
            attention.config = config


def _final_output(model: nn.Module, tower: VisionTower, pixel_values: torch.Tensor) -> tuple[str, torch.Tensor]:
    if type(model).__name__.endswith("ForImageClassification"):
        return "logits", model(pixel_values=pixel_values).logits
    return "features", tower.module(pixel_values=pixel_values).last_hidden_state


def _relation_log_probs(hidden: torch.Tensor) -> torch.Tensor:
    hidden = hidden.float()
    return torch.log_softmax(hidden @ hidden.transpose(1, 2) / math.sqrt(hidden.shape[-1]), dim=-1)


def _kl(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) summed over the last dimension, averaged over the others."""
    return (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1).mean()


class _Distiller:
    """Computes the three losses of one batch for a (student, teacher) pair."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig):
        self.student, self.teacher, self.config = student, teacher, config
        self.student_tower, self.teacher_tower = find_vision_tower(student), find_vision_tower(teacher)
        self.indices = [i for g in shared_groups(self.student_tower) for i in g]
        if not self.indices:
            raise ValueError("the student has no shared block groups; load it with RiverOneConfig(minivit=...)")
        if len(self.teacher_tower.blocks) != len(self.student_tower.blocks):
            raise ValueError(f"teacher has {len(self.teacher_tower.blocks)} vision blocks, student "
                             f"{len(self.student_tower.blocks)}: the teacher must be the original model")

    def losses(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, DistillLosses]:
        config = self.config
        with torch.no_grad(), _Capture(self.teacher_tower, self.indices) as teacher:
            kind, target = _final_output(self.teacher, self.teacher_tower, pixel_values)
        with _Capture(self.student_tower, self.indices) as student:
            _, output = _final_output(self.student, self.student_tower, pixel_values)
        if kind == "logits":
            t = config.temperature
            prediction = _kl(torch.log_softmax(target.float() / t, -1), torch.log_softmax(output.float() / t, -1)) * t * t
        else:
            prediction = (output.float() - target.float()).pow(2).sum() / target.float().pow(2).sum().clamp_min(1e-12)
        if any(student.maps[i] is None or teacher.maps[i] is None for i in self.indices):
            raise ValueError("an attention module returned no maps; its architecture cannot run eagerly here")
        attention = torch.stack([
            (student.maps[i].float() - teacher.maps[i].float()).pow(2).sum(-1).mean() for i in self.indices
        ]).mean()
        hidden = torch.stack([
            _kl(_relation_log_probs(teacher.hidden[i]), _relation_log_probs(student.hidden[i])) for i in self.indices
        ]).mean()
        total = config.prediction_weight * prediction + config.attention_weight * attention + config.hidden_weight * hidden
        parts = DistillLosses(total.item(), prediction.item(), attention.item(), hidden.item())
        return total, parts

    @contextlib.contextmanager
    def mode(self, train: bool):
        """Eager teacher attention, teacher in eval mode, student in `train` mode; all restored afterwards."""
        was_training = (self.student.training, self.teacher.training)
        self.student.train(train)
        self.teacher.eval()
        try:
            with _eager(self.teacher_tower, self.indices), _eager(self.student_tower, self.indices):
                yield
        finally:
            self.student.train(was_training[0])
            self.teacher.train(was_training[1])


def _batches_forever(batches: Iterable[torch.Tensor]):
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the batches iterable yielded nothing")


def evaluate_distillation(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor],
                          config: DistillConfig | None = None) -> DistillLosses:
    """The distillation losses averaged over `batches` (no training), e.g. on held-out images."""
    distiller = _Distiller(student, teacher, config or DistillConfig())
    results = []
    with distiller.mode(train=False), torch.no_grad():
        for pixel_values in batches:
            results.append(distiller.losses(pixel_values)[1])
    if not results:
        raise ValueError("the batches iterable yielded nothing")
    return DistillLosses(*(sum(getattr(r, f) for r in results) / len(results)
                           for f in ("total", "prediction", "attention", "hidden")))


def distill_minivit(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor],
                    config: DistillConfig | None = None) -> DistillResult:
    """Train the student's per-block parameters (and optionally its shared weights) to match the teacher.

    Args:
        student: the MiniViT-shared model (`from_pretrained(..., quantization_config=RiverOneConfig(minivit=...))`).
        teacher: the original model (same architecture, unshared).
        batches: an iterable of `pixel_values` tensors, iterated again when exhausted.
        config: `DistillConfig`.

    Returns the loss of every step and the number of parameters trained. Other parameters are frozen during
    the call; every parameter's `requires_grad` is restored afterwards.
    """
    config = config or DistillConfig()
    distiller = _Distiller(student, teacher, config)
    own = per_block_parameters(distiller.student_tower)
    shared = shared_parameters(distiller.student_tower) if config.train_shared else []
    groups = [{"params": own, "lr": config.lr}]
    if shared:
        groups.append({"params": shared, "lr": config.shared_lr or config.lr})
    trained = {id(p) for g in groups for p in g["params"]}
    saved = [(p, p.requires_grad) for p in student.parameters()]
    for parameter, _ in saved:
        parameter.requires_grad_(id(parameter) in trained)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    history = []
    try:
        with distiller.mode(train=True):
            for step, pixel_values in zip(range(config.steps), _batches_forever(batches)):
                total, parts = distiller.losses(pixel_values)
                if not math.isfinite(parts.total):
                    raise ValueError(f"distillation loss is not finite at step {step}: {parts}")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], config.max_grad_norm)
                optimizer.step()
                schedule.step()
                history.append(parts)
                if step % config.log_every == 0 or step == config.steps - 1:
                    logger.info("distill step %d/%d: %s", step + 1, config.steps, parts)
    finally:
        for parameter, requires_grad in saved:
            parameter.requires_grad_(requires_grad)
    return DistillResult(history, sum(p.numel() for g in groups for p in g["params"]))
