"""`RiverOneConfig` and the per-stage specs it holds.

`RiverOneConfig` is a transformers `QuantizationConfigMixin` (quant_method ``"riverone"``), so
`from_pretrained(..., quantization_config=RiverOneConfig(...))` and a saved `config.json` both carry it.
Each compression stage has one small dataclass spec; every field validates itself in `__post_init__`
and raises `ValueError` naming the field, the bad value and what is allowed, before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "riverone"
CODEBOOK_OPTIMIZERS = ("cg", "adam")
CONFIG_VERSION = 1


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high),
        f"`{name}` must be an integer {allowed}, got {value!r}",
    )


def _require_regex(name: str, pattern: Any) -> None:
    _require(isinstance(pattern, str), f"`{name}` must be a regular expression string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"`{name}` is not a valid regular expression: {pattern!r} ({err})") from None


def _spec_from_dict(cls, data: dict[str, Any], where: str):
    """Build a spec dataclass from a plain dict, naming unknown keys instead of a bare TypeError."""
    if isinstance(data, cls):
        return data
    _require(isinstance(data, dict), f"`{where}` must be a dict or {cls.__name__}, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    _require(not unknown, f"`{where}` has unknown field(s) {unknown}; allowed: {sorted(known)}")
    return cls(**data)


@dataclass
class AqlmScheme:
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
        self.validate_scheme()

    def validate_scheme(self, prefix: str = "") -> None:
        _require_int(prefix + "num_codebooks", self.num_codebooks, 1, 8)
        _require_int(prefix + "nbits_per_codebook", self.nbits_per_codebook, 1, 16)
        _require_int(prefix + "in_group_size", self.in_group_size, 1, 64)
        _require_int(prefix + "out_group_size", self.out_group_size, 1, 8)

    def scheme_dict(self) -> dict[str, int]:
        """The four fields that define the stored layout (what `aqlm.QuantizedLinear` takes)."""
        return {name: getattr(self, name) for name in SCHEME_FIELDS}

    def code_bits_per_weight(self) -> float:
        """Bits of codes per weight, excluding codebooks and scales."""
        return self.num_codebooks * self.nbits_per_codebook / (self.in_group_size * self.out_group_size)


SCHEME_FIELDS = ("num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size")


@dataclass
class ModuleOverride:
    """A different scheme, or no quantization at all, for the Linears whose full name matches `pattern`.

    Args:
        pattern (`str`): regular expression matched with `re.fullmatch` against the full module name,
            e.g. ``r".*\\.mlp\\.down_proj"``. The first override that matches a module wins.
        skip (`bool`, defaults to False): leave matching modules unquantized.
        num_codebooks / nbits_per_codebook / in_group_size / out_group_size (`int`, optional):
            replace the corresponding field of the stage's scheme for matching modules.
    """

    pattern: str = field(metadata={"help": "Regex, re.fullmatch against the full module name."})
    skip: bool = field(default=False, metadata={"help": "Leave matching modules unquantized."})
    num_codebooks: int | None = None
    nbits_per_codebook: int | None = None
    in_group_size: int | None = None
    out_group_size: int | None = None

    def __post_init__(self):
        _require_regex("overrides[].pattern", self.pattern)
        _require(isinstance(self.skip, bool), f"`overrides[].skip` must be a bool, got {self.skip!r}")
        changed = {k: getattr(self, k) for k in SCHEME_FIELDS if getattr(self, k) is not None}
        _require(
            self.skip or changed,
            f"`overrides[]` entry for pattern {self.pattern!r} must set `skip: true` or at least one of {list(SCHEME_FIELDS)}",
        )
        _require(
            not (self.skip and changed),
            f"`overrides[]` entry for pattern {self.pattern!r} sets `skip` together with {sorted(changed)}; choose one",
        )
        AqlmScheme(**{**AqlmScheme().scheme_dict(), **changed}).validate_scheme(prefix="overrides[].")

    def matches(self, module_name: str) -> bool:
        return re.fullmatch(self.pattern, module_name) is not None


@dataclass
class CalibrationSpec:
    """Local text used to collect XᵀX per Linear for output-aware quantization.

    Exactly one source: `text_files` (plain UTF-8 files, concatenated) or `dataset_path`
    (a directory written by `datasets` `save_to_disk`, read with `load_from_disk`).

    Args:
        text_files (`list[str]`, optional): paths of plain text files.
        dataset_path (`str`, optional): a local `datasets` directory (a Dataset or a DatasetDict).
        text_column (`str`, defaults to "text"): the column holding text in `dataset_path`.
        split (`str`, defaults to "train"): the split used when `dataset_path` holds a DatasetDict.
        tokenizer (`str`, optional): tokenizer path or id; defaults to the model's own directory.
        num_samples (`int`, defaults to 128): number of token windows drawn.
        seq_len (`int`, defaults to 512): tokens per window.
        seed (`int`, defaults to 0): seed for drawing the windows.
    """

    text_files: list[str] | None = None
    dataset_path: str | None = None
    text_column: str = "text"
    split: str = "train"
    tokenizer: str | None = None
    num_samples: int = field(default=128, metadata={"help": "Number of token windows, >= 1."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per window, >= 2."})
    seed: int = 0

    def __post_init__(self):
        _require(
            (self.text_files is None) != (self.dataset_path is None),
            "`calibration` needs exactly one of `text_files` (list of paths) or `dataset_path` (a local "
            f"`datasets` directory); got text_files={self.text_files!r}, dataset_path={self.dataset_path!r}",
        )
        if self.text_files is not None:
            _require(
                isinstance(self.text_files, list) and self.text_files and all(isinstance(p, str) for p in self.text_files),
                f"`calibration.text_files` must be a non-empty list of paths, got {self.text_files!r}",
            )
        _require_int("calibration.num_samples", self.num_samples, 1)
        _require_int("calibration.seq_len", self.seq_len, 2)
        _require_int("calibration.seed", self.seed, 0)


@dataclass
class AqlmSpec(AqlmScheme):
    """AQLM additive quantization of Linear layers (stored in the `aqlm` package's layout).

    Args:
        num_codebooks, nbits_per_codebook, in_group_size, out_group_size: see `AqlmScheme`.
        beam_size (`int`, defaults to 4): candidates kept per group in the beam search over codes.
        max_epochs (`int`, defaults to 10): most rounds of (codebook update, beam search).
        steps_per_epoch (`int`, defaults to 5): codebook-update steps per round: conjugate-gradient
            iterations with `codebook_optimizer="cg"` (5 gets most of the gain), Adam steps with `"adam"`
            (the reference AQLM code uses 100).
        relative_tolerance (`float`, defaults to 0.01): stop when a round improves the objective by less
            than this fraction.
        codebook_lr (`float`, defaults to 1e-4): Adam learning rate for codebooks and scales (`"adam"` only).
        codebook_optimizer (`str`, defaults to `"cg"`): how codebooks and scales are fitted to the codes
            each round. `"cg"`: scales solved in closed form and preconditioned conjugate gradient on the
            codebooks (the objective is quadratic in them for fixed codes and scales); `"adam"`: Adam with
            `codebook_lr`, as the reference AQLM code does.
        kmeans_iters (`int`, defaults to 10): most k-means iterations of the residual initialisation (each
            k-means also stops once an iteration lowers its squared error by less than 0.1%).
        seed (`int`, defaults to 0): seed of every stochastic step (same seed, same codes).
        calibration (`CalibrationSpec` or dict, optional): local text for output-aware (XᵀX) quantization;
            data-free (XᵀX = identity) when absent.
        target_modules (`list[str]`, optional): regexes (`re.fullmatch` on full module names) of the
            Linears to quantize. Default: every Linear of the language model's decoder; the vision tower,
            projector, embeddings and lm_head are left alone unless matched here.
        modules_to_not_convert (`list[str]`, optional): module names never quantized, matched the way
            transformers' `should_convert_module` does (prefix at a module boundary, regex, or suffix).
        overrides (`list[ModuleOverride]`, optional): per-module scheme changes or skips; first match wins.
    """

    beam_size: int = field(default=4, metadata={"help": "Beam width of the code search, 1..256."})
    max_epochs: int = field(default=10, metadata={"help": "Most rounds of codebook update + beam search, >= 0."})
    steps_per_epoch: int = field(
        default=5, metadata={"help": "Codebook-update steps per round (CG iterations, or Adam steps), >= 0."}
    )
    relative_tolerance: float = field(default=0.01, metadata={"help": "Stop when a round gains less, in [0, 1)."})
    codebook_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate, > 0."})
    codebook_optimizer: str = field(
        default="cg", metadata={"help": "Codebook update each round: 'cg' (closed-form scales + CG) or 'adam'."}
    )
    kmeans_iters: int = field(default=10, metadata={"help": "k-means iterations of the initialisation, >= 0."})
    seed: int = field(default=0, metadata={"help": "Seed of every stochastic step, >= 0."})
    calibration: CalibrationSpec | None = None
    target_modules: list[str] | None = None
    modules_to_not_convert: list[str] | None = None
    overrides: list[ModuleOverride] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        _require_int("beam_size", self.beam_size, 1, 256)
        _require_int("max_epochs", self.max_epochs, 0)
        _require_int("steps_per_epoch", self.steps_per_epoch, 0)
        _require_int("kmeans_iters", self.kmeans_iters, 0)
        _require_int("seed", self.seed, 0)
        _require(
            isinstance(self.relative_tolerance, (int, float)) and 0 <= self.relative_tolerance < 1,
            f"`relative_tolerance` must be a number in [0, 1), got {self.relative_tolerance!r}",
        )
        _require(
            isinstance(self.codebook_lr, (int, float)) and self.codebook_lr > 0,
            f"`codebook_lr` must be a positive number, got {self.codebook_lr!r}",
        )
        _require(
            self.codebook_optimizer in CODEBOOK_OPTIMIZERS,
            f"`codebook_optimizer` must be one of {list(CODEBOOK_OPTIMIZERS)}, got {self.codebook_optimizer!r}",
        )
        if self.calibration is not None:
            self.calibration = _spec_from_dict(CalibrationSpec, self.calibration, "calibration")
        for name in ("target_modules", "modules_to_not_convert"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
                f"`{name}` must be a list of strings or None, got {value!r}",
            )
        for pattern in self.target_modules or []:
            _require_regex("target_modules[]", pattern)
        _require(isinstance(self.overrides, list), f"`overrides` must be a list, got {self.overrides!r}")
        self.overrides = [_spec_from_dict(ModuleOverride, o, "overrides[]") for o in self.overrides]

    def for_module(self, module_name: str) -> AqlmSpec | None:
        """This spec with the first matching override applied, or None when that override says skip."""
        for override in self.overrides:
            if override.matches(module_name):
                if override.skip:
                    return None
                changed = {k: getattr(override, k) for k in SCHEME_FIELDS if getattr(override, k) is not None}
                return dataclasses.replace(self, **changed)
        return self


@dataclass
class MiniViTSpec:
    """MiniViT weight multiplexing of vision-transformer blocks (arXiv 2204.07154).

    Within a group of adjacent blocks every block uses the first block's attention and MLP modules;
    each block keeps its own norms and layer-scales and gets small transforms initialised to identity.

    Args:
        groups (`list[list[int]]`, optional): explicit groups of adjacent block indices, e.g. ``[[0, 1], [2, 3]]``.
        share_every (`int`, optional): instead of `groups`, share every `share_every` adjacent blocks in
            ``[start, end)`` (`end` None: the last block).
        start, end (`int`, optional): the block range for `share_every`.
        transforms (`list[str]`, defaults to ["attention", "mlp"]): which per-block transforms to add:
            "attention" (heads x heads mixing of the logits before and the maps after softmax; those blocks
            then compute attention eagerly) and/or "mlp" (a depthwise convolution over the 2-D patch grid
            of the MLP input, residual, initialised to zero; CLS/register tokens bypass it). `[]`: plain sharing.
        conv_kernel_size (`int`, defaults to 3): odd kernel size of the MLP transform's convolution.
    """

    groups: list[list[int]] | None = None
    share_every: int | None = None
    start: int = 0
    end: int | None = None
    transforms: list[str] = field(default_factory=lambda: ["attention", "mlp"])
    conv_kernel_size: int = 3

    def __post_init__(self):
        _require(
            (self.groups is None) != (self.share_every is None),
            f"`minivit` needs exactly one of `groups` or `share_every`; got groups={self.groups!r}, "
            f"share_every={self.share_every!r}",
        )
        if self.groups is not None:
            _require(
                isinstance(self.groups, list) and self.groups
                and all(isinstance(g, list) and len(g) >= 2 for g in self.groups),
                f"`minivit.groups` must be a non-empty list of lists of >= 2 block indices, got {self.groups!r}",
            )
            seen: set[int] = set()
            for group in self.groups:
                for index in group:
                    _require_int("minivit.groups[][]", index, 0)
                _require(
                    group == list(range(group[0], group[0] + len(group))),
                    f"`minivit.groups` entry {group} must list adjacent blocks in increasing order",
                )
                overlap = seen & set(group)
                _require(not overlap, f"`minivit.groups` overlap on block(s) {sorted(overlap)}")
                seen |= set(group)
        else:
            _require_int("minivit.share_every", self.share_every, 2)
        _require(
            self.share_every is not None or (self.start == 0 and self.end is None),
            f"`minivit.start`/`minivit.end` apply only with `share_every`; with `groups` list the blocks "
            f"themselves (got start={self.start!r}, end={self.end!r})",
        )
        _require_int("minivit.start", self.start, 0)
        _require(self.end is None or (isinstance(self.end, int) and self.end > self.start),
                 f"`minivit.end` must be None or an integer > start ({self.start}), got {self.end!r}")
        allowed = ("attention", "mlp")
        _require(
            isinstance(self.transforms, list) and all(t in allowed for t in self.transforms)
            and len(set(self.transforms)) == len(self.transforms),
            f"`minivit.transforms` must be a list of distinct entries drawn from {list(allowed)} ([] for plain "
            f"sharing), got {self.transforms!r}",
        )
        _require(
            isinstance(self.conv_kernel_size, int) and self.conv_kernel_size >= 1 and self.conv_kernel_size % 2 == 1,
            f"`minivit.conv_kernel_size` must be an odd integer >= 1, got {self.conv_kernel_size!r}",
        )

    def resolve_groups(self, num_blocks: int) -> list[list[int]]:
        """The groups of block indices for a tower of `num_blocks` blocks; ValueError if out of range."""
        if self.groups is not None:
            groups = self.groups
        else:
            end = num_blocks if self.end is None else self.end
            groups = [list(range(i, min(i + self.share_every, end))) for i in range(self.start, end, self.share_every)]
            groups = [g for g in groups if len(g) >= 2]
        bad = sorted({i for g in groups for i in g if i >= num_blocks})
        _require(not bad, f"`minivit` names block(s) {bad}, but the vision tower has {num_blocks} blocks (0..{num_blocks - 1})")
        _require(groups, f"`minivit` selects no group of >= 2 blocks among the {num_blocks} blocks")
        return groups


VQC_INIT_MODES = ("fit", "random")
MAX_VQC_WIRES = 12  # state-vector simulation: 2^wires amplitudes per circuit evaluation
MAX_VQC_EXACT_NOISE_WIRES = 8  # default.mixed: a 4^wires density matrix per circuit evaluation


@dataclass
class VqcSpec:
    """Swap chosen Linears for `VQCGeneratedLinear`: a variational circuit (PennyLane) whose
    measurements drive a chunked hypernetwork that generates the weight as low-rank factors W = U Vᵀ.
    The VQC stage runs after MiniViT and before AQLM: a Linear it takes is left alone by AQLM.

    Args:
        target_modules (`list[str]`): regexes, `re.fullmatch` against full module names; each must match a Linear.
        n_wires (`int`, defaults to 4): qubits of the circuit, 1..12 (1..8 with `exact_noise`).
        n_layers (`int`, defaults to 2): layers of trainable RX, RY, RZ + CNOT ring.
        rank (`int`, defaults to 8): rank r of W = U Vᵀ, at most min(in, out) of every targeted Linear.
        hidden_size (`int`, defaults to 32): hidden width of the hypernetwork.
        chunk_size (`int`, defaults to 64): rows of U (and V) emitted per chunk, each chunk with its own context.
        noise_probability (`float`, defaults to 0.0): depolarizing noise per wire and layer, training mode only.
        exact_noise (`bool`, defaults to False): simulate the noise channel exactly with `default.mixed` (slow)
            instead of sampling one Pauli trajectory per chunk and call.
        init (`str`, defaults to "fit"): "fit" the generator to the replaced weight, or "random".
        init_steps (`int`, defaults to 200): Adam steps of the "fit" initialisation (after a least-squares warm start).
        init_lr (`float`, defaults to 1e-3): Adam learning rate of the "fit" initialisation.
        calibration (`CalibrationSpec` or dict, optional): local text; "fit" then minimises the output error
            through XᵀX of each Linear's inputs instead of the weight error.
        baselines (`bool`, defaults to True): also fit the classical-vector ablation (doubles the fit time) for
            the accounting table; the truncated-SVD baseline is always measured.
        seed (`int`, defaults to 0): seed of the initialisation.
    """

    target_modules: list[str] = field(
        default_factory=list, metadata={"help": "Regexes, re.fullmatch against full module names; each must match."}
    )
    n_wires: int = field(default=4, metadata={"help": f"Qubits, 1..{MAX_VQC_WIRES}."})
    n_layers: int = field(default=2, metadata={"help": "Circuit layers (RX, RY, RZ + CNOT ring), >= 1."})
    rank: int = field(default=8, metadata={"help": "Rank r of W = U Vᵀ, <= min(in, out) of each target."})
    hidden_size: int = field(default=32, metadata={"help": "Hypernetwork width, >= 1."})
    chunk_size: int = field(default=64, metadata={"help": "Rows of U / V emitted per chunk, >= 1."})
    noise_probability: float = field(default=0.0, metadata={"help": "Depolarizing noise in training, [0, 1)."})
    exact_noise: bool = field(default=False, metadata={"help": "Exact channel on default.mixed (slow)."})
    init: str = field(default="fit", metadata={"help": f"One of {list(VQC_INIT_MODES)}."})
    init_steps: int = field(default=200, metadata={"help": "Adam steps of the fit, >= 0."})
    init_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the fit, > 0."})
    calibration: CalibrationSpec | None = None
    baselines: bool = field(default=True, metadata={"help": "Fit the classical-vector ablation for the report."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, >= 0."})

    def __post_init__(self):
        _require(
            isinstance(self.target_modules, list) and self.target_modules,
            f"`vqc.target_modules` must be a non-empty list of regexes, got {self.target_modules!r}",
        )
        for pattern in self.target_modules:
            _require_regex("vqc.target_modules[]", pattern)
        _require_int("vqc.n_wires", self.n_wires, 1, MAX_VQC_WIRES)
        _require_int("vqc.n_layers", self.n_layers, 1)
        _require_int("vqc.rank", self.rank, 1)
        _require_int("vqc.hidden_size", self.hidden_size, 1)
        _require_int("vqc.chunk_size", self.chunk_size, 1)
        _require(
            isinstance(self.noise_probability, (int, float)) and not isinstance(self.noise_probability, bool)
            and 0 <= self.noise_probability < 1,
            f"`vqc.noise_probability` must be a number in [0, 1), got {self.noise_probability!r}",
        )
        _require(isinstance(self.exact_noise, bool), f"`vqc.exact_noise` must be a bool, got {self.exact_noise!r}")
        _require(
            not self.exact_noise or self.n_wires <= MAX_VQC_EXACT_NOISE_WIRES,
            f"`vqc.n_wires` must be <= {MAX_VQC_EXACT_NOISE_WIRES} with `vqc.exact_noise` (default.mixed holds a "
            f"4^n_wires density matrix), got {self.n_wires}",
        )
        _require(self.init in VQC_INIT_MODES, f"`vqc.init` must be one of {list(VQC_INIT_MODES)}, got {self.init!r}")
        _require_int("vqc.init_steps", self.init_steps, 0)
        _require(isinstance(self.init_lr, (int, float)) and not isinstance(self.init_lr, bool) and self.init_lr > 0,
                 f"`vqc.init_lr` must be a positive number, got {self.init_lr!r}")
        if self.calibration is not None:
            self.calibration = _spec_from_dict(CalibrationSpec, self.calibration, "vqc.calibration")
        _require(isinstance(self.baselines, bool), f"`vqc.baselines` must be a bool, got {self.baselines!r}")
        _require_int("vqc.seed", self.seed, 0)


# Stage name -> spec class, in the order the stages are applied: MiniViT shares vision blocks first,
# VQC then swaps the Linears it targets (it wins over AQLM for a Linear both would take), AQLM last.
STAGE_SPECS: dict[str, type] = {"minivit": MiniViTSpec, "vqc": VqcSpec, "aqlm": AqlmSpec}


class RiverOneConfig(QuantizationConfigMixin):
    """Quantization config of riverone_hf: one optional spec per compression stage.

    Args:
        aqlm (`AqlmSpec` or dict, optional): additive quantization of Linear layers.
        minivit (`MiniViTSpec` or dict, optional): weight multiplexing of vision blocks.
        vqc (`VqcSpec` or dict, optional): VQC-generated Linears.
        quantization_map (`dict`, optional): written by riverone_hf after compression, one entry per
            converted module (``{"model.layers.0.mlp.up_proj": {"stage": "aqlm", "num_codebooks": 2, ...}}``);
            a pre-quantized load rebuilds exactly these modules before the weights load. Users leave it empty.
        version (`int`): format version of this config.
    """

    def __init__(
        self,
        aqlm: AqlmSpec | dict | None = None,
        minivit: MiniViTSpec | dict | None = None,
        vqc: VqcSpec | dict | None = None,
        quantization_map: dict[str, dict[str, Any]] | None = None,
        version: int = CONFIG_VERSION,
        **kwargs,
    ):
        kwargs.pop("quant_method", None)
        unknown = sorted(kwargs)
        _require(
            not unknown,
            f"RiverOneConfig got unknown field(s) {unknown}; allowed: {sorted([*STAGE_SPECS, 'quantization_map', 'version'])}",
        )
        self.quant_method = QUANT_METHOD
        for name, spec in (("aqlm", aqlm), ("minivit", minivit), ("vqc", vqc)):
            setattr(self, name, None if spec is None else _spec_from_dict(STAGE_SPECS[name], spec, name))
        _require_int("version", version, 1, CONFIG_VERSION)
        self.version = version
        _require(
            quantization_map is None or isinstance(quantization_map, dict),
            f"`quantization_map` must be a dict or None, got {type(quantization_map).__name__}",
        )
        self.quantization_map = dict(quantization_map or {})
        _require(
            any(getattr(self, name) is not None for name in STAGE_SPECS) or self.quantization_map,
            f"RiverOneConfig needs at least one stage; set one of {sorted(STAGE_SPECS)}",
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": self.quant_method, "version": self.version}
        for name in STAGE_SPECS:
            spec = getattr(self, name)
            out[name] = None if spec is None else dataclasses.asdict(spec)
        out["quantization_map"] = copy.deepcopy(self.quantization_map)
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other) -> bool:
        return isinstance(other, RiverOneConfig) and self.to_dict() == other.to_dict()


def load_config_file(path: str) -> RiverOneConfig:
    """Read a `RiverOneConfig` from a YAML (or JSON) file whose top-level keys are the config's fields."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    _require(isinstance(data, dict), f"{path}: expected a mapping of RiverOneConfig fields, got {type(data).__name__}")
    return RiverOneConfig.from_dict(data)
