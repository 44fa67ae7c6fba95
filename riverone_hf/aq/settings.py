"""The AQ engine's own settings: the scheme (what is stored) and the search (how it is found).

Plain dataclasses with no transformers import, so the engine can be used on tensors alone. The AQLM
stage's spec (`stages.aqlm.AqlmSpec`) extends `AqSettings` with what only a model needs (targets,
calibration, overrides), so a spec IS a valid engine setting.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..validation import require_choice, require_int, require_number

SCHEME_FIELDS = ("num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


class CodebookOptimizer(str, enum.Enum):
    """How each round fits codebooks and scales to the current codes."""

    CG = "cg"
    """Scales in closed form, then preconditioned conjugate gradient on the codebooks (the objective is
    quadratic in them for fixed codes and scales)."""
    ADAM = "adam"
    """Adam with `codebook_lr` on codebooks and scales, as the reference AQLM code does."""


@dataclass
class AqScheme:
    """The shape of one additive quantization: M codebooks of 2^B vectors of out_group x in_group weights.

    Args:
        num_codebooks (`int`, defaults to 2): codebooks summed per weight group (M), 1..8.
        nbits_per_codebook (`int`, defaults to 8): log2 of the codebook size (B), 1..16.
        in_group_size (`int`, defaults to 8): consecutive input weights per code, 1..64.
        out_group_size (`int`, defaults to 1): consecutive output rows per code, 1..8.
    """

    num_codebooks: int = field(default=2, metadata={"help": "Codebooks summed per weight group (M), 1..8."})
    nbits_per_codebook: int = field(default=8, metadata={"help": "log2 of the codebook size (B), 1..16."})
    in_group_size: int = field(default=8, metadata={"help": "Consecutive input weights per code, 1..64."})
    out_group_size: int = field(default=1, metadata={"help": "Consecutive output rows per code, 1..8."})

    def __post_init__(self):
        require_int("num_codebooks", self.num_codebooks, 1, 8)
        require_int("nbits_per_codebook", self.nbits_per_codebook, 1, 16)
        require_int("in_group_size", self.in_group_size, 1, 64)
        require_int("out_group_size", self.out_group_size, 1, 8)

    def scheme_dict(self) -> dict[str, int]:
        """The four fields that define the stored layout (what `aqlm.QuantizedLinear` takes)."""
        return {name: getattr(self, name) for name in SCHEME_FIELDS}


@dataclass
class AqSettings(AqScheme):
    """Scheme plus search settings of `engine.quantize_weight`.

    Args:
        num_codebooks, nbits_per_codebook, in_group_size, out_group_size: see `AqScheme`.
        beam_size (`int`, defaults to 4): candidates kept per group in the beam search over codes, 1..256.
        max_epochs (`int`, defaults to 10): most rounds of (codebook update, beam search).
        steps_per_epoch (`int`, defaults to 5): codebook-update steps per round: conjugate-gradient
            iterations with `codebook_optimizer="cg"`, Adam steps with `"adam"` (the reference AQLM code
            uses 100).
        relative_tolerance (`float`, defaults to 0.01): stop when a round improves the objective by less
            than this fraction.
        codebook_lr (`float`, defaults to 1e-4): Adam learning rate for codebooks and scales (`"adam"` only).
        codebook_optimizer (`CodebookOptimizer` or str, defaults to `"cg"`): see `CodebookOptimizer`.
        kmeans_iters (`int`, defaults to 10): most k-means iterations of the residual initialisation (each
            k-means also stops once an iteration lowers its squared error by less than 0.1%).
        seed (`int`, defaults to 0): seed of every stochastic step (same seed, same codes).
    """

    beam_size: int = field(default=4, metadata={"help": "Beam width of the code search, 1..256."})
    max_epochs: int = field(default=10, metadata={"help": "Most rounds of codebook update + beam search, >= 0."})
    steps_per_epoch: int = field(
        default=5, metadata={"help": "Codebook-update steps per round (CG iterations, or Adam steps), >= 0."}
    )
    relative_tolerance: float = field(default=0.01, metadata={"help": "Stop when a round gains less, in [0, 1)."})
    codebook_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate (codebook_optimizer 'adam'), > 0."})
    codebook_optimizer: CodebookOptimizer = field(
        default=CodebookOptimizer.CG,
        metadata={"help": "Codebook update each round: 'cg' (closed-form scales + CG) or 'adam'."},
    )
    kmeans_iters: int = field(default=10, metadata={"help": "k-means iterations of the initialisation, >= 0."})
    seed: int = field(default=0, metadata={"help": f"Seed of every stochastic step, 0..{MAX_SEED}."})

    def __post_init__(self):
        super().__post_init__()
        require_int("beam_size", self.beam_size, 1, 256)
        require_int("max_epochs", self.max_epochs, 0, 10_000)
        require_int("steps_per_epoch", self.steps_per_epoch, 0, 100_000)
        require_int("kmeans_iters", self.kmeans_iters, 0, 100_000)
        require_int("seed", self.seed, 0, MAX_SEED)
        require_number("relative_tolerance", self.relative_tolerance, 0, 1)
        require_number("codebook_lr", self.codebook_lr, 0, None, low_open=True)
        self.codebook_optimizer = require_choice("codebook_optimizer", self.codebook_optimizer, CodebookOptimizer)
