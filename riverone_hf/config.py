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
        beam_size (`int`, defaults to 8): candidates kept per group in the beam search over codes.
        max_epochs (`int`, defaults to 10): most rounds of (codebook update, beam search).
        steps_per_epoch (`int`, defaults to 100): Adam steps on codebooks and scales per round.
        relative_tolerance (`float`, defaults to 0.01): stop when a round improves the objective by less
            than this fraction.
        codebook_lr (`float`, defaults to 1e-4): Adam learning rate for codebooks and scales.
        kmeans_iters (`int`, defaults to 100): k-means iterations of the residual initialisation.
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

    beam_size: int = field(default=8, metadata={"help": "Beam width of the code search, 1..256."})
    max_epochs: int = field(default=10, metadata={"help": "Most rounds of codebook update + beam search, >= 0."})
    steps_per_epoch: int = field(default=100, metadata={"help": "Adam steps per round, >= 0."})
    relative_tolerance: float = field(default=0.01, metadata={"help": "Stop when a round gains less, in [0, 1)."})
    codebook_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate, > 0."})
    kmeans_iters: int = field(default=100, metadata={"help": "k-means iterations of the initialisation, >= 0."})
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


STAGE_SPECS: dict[str, type] = {"aqlm": AqlmSpec}


class RiverOneConfig(QuantizationConfigMixin):
    """Quantization config of riverone_hf: one optional spec per compression stage.

    Args:
        aqlm (`AqlmSpec` or dict, optional): additive quantization of Linear layers.
        quantization_map (`dict`, optional): written by riverone_hf after compression, one entry per
            converted module (``{"model.layers.0.mlp.up_proj": {"stage": "aqlm", "num_codebooks": 2, ...}}``);
            a pre-quantized load rebuilds exactly these modules before the weights load. Users leave it empty.
        version (`int`): format version of this config.
    """

    def __init__(
        self,
        aqlm: AqlmSpec | dict | None = None,
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
        self.aqlm = None if aqlm is None else _spec_from_dict(AqlmSpec, aqlm, "aqlm")
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
