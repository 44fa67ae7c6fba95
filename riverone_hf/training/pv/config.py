"""PV-Tuning settings: `PVTuningConfig` (what `get_pv_model` needs) and `PVTrainingArguments` (the loss).

Defaults follow the official PV-Tuning settings (Malinovskii et al., 2024, arXiv 2405.14852): code lr 1e-2,
code betas (0, 0.95), at most 1e-2 of the code groups re-encoded per step, beam 5. Every range is checked here,
before any work starts, with a `ValueError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ...stages.targeting import require_target_modules


@dataclass
class PVTuningConfig:
    """How the quantized model is tuned: which continuous parameters the P-step trains, how the V-step moves codes."""

    code_lr: float = field(default=1e-2, metadata={"help": "V-step: learning rate of the Adam-like step on the fp32 "
                                                           "straight-through proxy of each quantized weight; scaled "
                                                           "by the P-step's lr schedule (current lr / initial lr)."})
    code_betas: list[float] = field(default_factory=lambda: [0.0, 0.95], metadata={
        "help": "V-step: (beta1, beta2) of the proxy's Adam-like step, each in [0, 1)."})
    code_trust_ratio: bool = field(default=True, metadata={
        "help": "V-step: Lamb-style scaling of the proxy step to code_lr * ||proxy|| / ||step direction||, so code_lr "
                "is a relative change per step whatever the weight's scale (False: plain Adam step of size code_lr)."})
    code_eps: float = field(default=1e-8, metadata={"help": "V-step: epsilon of the proxy's Adam-like step."})
    max_code_change_per_step: float = field(default=1e-2, metadata={
        "help": "V-step: tau in (0, 1], the fraction of code groups of each weight re-encoded per step (those whose "
                "proxy moved furthest from the dequantized weight); at most floor(tau * groups) change."})
    delta_decay: float = field(default=0.0, metadata={
        "help": "V-step: after re-encoding, each proxy moves this fraction of the way to its current dequantized "
                "weight, in [0, 1] (the official code's delta_decay). 0: pure straight-through (the proxy keeps every "
                "step, also those the codes could not follow); 1: the proxy restarts from the dequantized weight "
                "after each step, so the re-encoding follows one step's update, not all those accumulated."})
    proxy_follows_p_step: bool = field(default=False, metadata={
        "help": "V-step: before each proxy step, add to the proxy the change the P-step just made to the dequantized "
                "weight (new codebooks/scales, same codes), so the proxy is the current weight plus the accumulated "
                "straight-through updates. False (the official code): the proxy keeps the weight it started from, and "
                "the re-encoding pulls codes back towards the codebooks and scales of before the P-steps."})
    v_step_every: int = field(default=1, metadata={
        "help": "V-step: run it on every k-th optimizer step (>= 1), on the mean of the weight gradients of the k "
                "steps since the last one (the P-step runs every step): k times the tokens behind each re-encoding, "
                "at no extra compute, since the gradients are computed for the P-step anyway."})
    beam_size: int = field(default=5, metadata={"help": "V-step: beam size of the re-encoding beam search (>= 1)."})
    max_chunk_bytes: int = field(default=16 * 2**20, metadata={
        "help": "V-step: memory bound (bytes) of one beam-search chunk; output groups are searched in chunks."})
    train_codebooks: bool = field(default=True, metadata={"help": "P-step: train the AqlmLinear codebooks."})
    train_scales: bool = field(default=True, metadata={"help": "P-step: train the AqlmLinear scales."})
    train_norms_and_biases: bool = field(default=True, metadata={
        "help": "P-step: train every 1-D parameter outside the embeddings / lm_head (norm weights, biases)."})
    train_embeddings: bool = field(default=False, metadata={
        "help": "P-step: also train the input embeddings and the output head (lm_head)."})
    modules_to_train: list[str] | None = field(default=None, metadata={
        "help": "P-step: modules trained in full besides the above, e.g. ['multi_modal_projector'] (peft's "
                "convention: names or dotted suffixes, like peft's modules_to_save; in Python also one regex string)."})
    v_step: bool = field(default=True, metadata={"help": "Run the V-step (False: P-only ablation, codes frozen)."})
    code_seed: int = field(default=0, metadata={
        "help": "Seed of the beam search's visiting order (per V-step: code_seed + step)."})

    def __post_init__(self):
        self.code_betas = tuple(float(b) for b in self.code_betas)
        if not self.code_lr > 0:
            raise ValueError(f"`code_lr` must be > 0, got {self.code_lr}")
        if len(self.code_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.code_betas):
            raise ValueError(f"`code_betas` must be two values in [0, 1), got {self.code_betas}")
        if not self.code_eps > 0:
            raise ValueError(f"`code_eps` must be > 0, got {self.code_eps}")
        if not 0.0 < self.max_code_change_per_step <= 1.0:
            raise ValueError(f"`max_code_change_per_step` (tau) must be in (0, 1], got {self.max_code_change_per_step}")
        if not 0.0 <= self.delta_decay <= 1.0:
            raise ValueError(f"`delta_decay` must be in [0, 1], got {self.delta_decay}")
        if int(self.v_step_every) != self.v_step_every or self.v_step_every < 1:
            raise ValueError(f"`v_step_every` must be an integer >= 1, got {self.v_step_every}")
        if int(self.beam_size) != self.beam_size or self.beam_size < 1:
            raise ValueError(f"`beam_size` must be an integer >= 1, got {self.beam_size}")
        if self.max_chunk_bytes < 1:
            raise ValueError(f"`max_chunk_bytes` must be >= 1, got {self.max_chunk_bytes}")
        require_target_modules("modules_to_train", self.modules_to_train, allow_none=True)


@dataclass
class PVTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the PV-Tuning loss: KL to a teacher's logits, cross-entropy on the data, or a mix."""

    kl_weight: float | None = field(default=None, metadata={
        "help": "Weight of KL(teacher || student) on the label positions. None: 1 with a teacher, 0 without."})
    ce_weight: float | None = field(default=None, metadata={
        "help": "Weight of the cross-entropy on the labels. None: 0 with a teacher, 1 without."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term (> 0)."})
    monotonicity_every: int = field(default=1, metadata={
        "help": "Every this many optimizer steps, log the loss on a fixed held-out batch before the P-step, after "
                "it and after the V-step (0: never); with v_step_every > 1, only the steps that run a V-step."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("kl_weight", "ce_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}")
        if self.kl_weight == 0 and self.ce_weight == 0:
            raise ValueError("`kl_weight` and `ce_weight` are both 0: nothing to train on")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}")
        if self.monotonicity_every < 0:
            raise ValueError(f"`monotonicity_every` must be >= 0, got {self.monotonicity_every}")

    def loss_weights(self, has_teacher: bool) -> tuple[float, float]:
        """(kl_weight, ce_weight) with the defaults resolved; raises if the KL term needs a missing teacher."""
        kl = self.kl_weight if self.kl_weight is not None else (1.0 if has_teacher else 0.0)
        ce = self.ce_weight if self.ce_weight is not None else (0.0 if has_teacher else 1.0)
        if kl > 0 and not has_teacher:
            raise ValueError(f"`kl_weight` is {kl} but no `teacher_model` was given (pass one, or set kl_weight=0)")
        if kl == 0 and ce == 0:
            raise ValueError("`kl_weight` and `ce_weight` resolve to 0: nothing to train on")
        return kl, ce
