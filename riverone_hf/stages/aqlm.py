"""The AQLM stage: additive quantization of Linear layers in the `aqlm` package's layout.

Its spec (`AqlmSpec`: the engine's `AqSettings` plus targets, calibration and per-module overrides), which
Linears it converts, the skeleton for riverone checkpoints, on-the-fly quantization of loaded dense
weights (data-free, or calibrated block by block), and dequantization back to `nn.Linear`s.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.quantizers.quantizers_utils import should_convert_module

from ..aq import AqScheme, AqSettings, quantize_weight
from ..aq.settings import SCHEME_FIELDS
from ..config import StagePlan
from ..modeling.aqlm_linear import AqlmLinear
from ..validation import require, require_bool, require_regex, spec_from_dict
from .block_finetune import BlockFinetuneSpec
from .calibration_data import CalibratedStage, CalibrationSpec
from .targeting import is_claimed, modules_matching, require_target_modules, tied_module_names

logger = logging.getLogger(__name__)


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
    num_codebooks: int | None = field(default=None, metadata={"help": "Replaces the stage's num_codebooks."})
    nbits_per_codebook: int | None = field(default=None, metadata={"help": "Replaces the stage's nbits_per_codebook."})
    in_group_size: int | None = field(default=None, metadata={"help": "Replaces the stage's in_group_size."})
    out_group_size: int | None = field(default=None, metadata={"help": "Replaces the stage's out_group_size."})

    def __post_init__(self):
        require_regex("overrides[].pattern", self.pattern)
        require_bool("overrides[].skip", self.skip)
        changed = self.scheme_changes()
        require(
            self.skip or changed,
            f"`overrides[]` entry for pattern {self.pattern!r} must set `skip: true` or at least one of {list(SCHEME_FIELDS)}",
        )
        require(
            not (self.skip and changed),
            f"`overrides[]` entry for pattern {self.pattern!r} sets `skip` together with {sorted(changed)}; choose one",
        )
        try:
            AqScheme(**{**AqScheme().scheme_dict(), **changed})
        except ValueError as err:
            raise ValueError(f"`overrides[]` entry for pattern {self.pattern!r}: {err}") from None

    def scheme_changes(self) -> dict[str, int]:
        """The scheme fields this override sets."""
        return {k: getattr(self, k) for k in SCHEME_FIELDS if getattr(self, k) is not None}

    def matches(self, module_name: str) -> bool:
        return re.fullmatch(self.pattern, module_name) is not None


@dataclass
class AqlmSpec(AqSettings):
    """AQLM additive quantization of Linear layers (stored in the `aqlm` package's layout).

    Args:
        num_codebooks, nbits_per_codebook, in_group_size, out_group_size, beam_size, max_epochs,
        steps_per_epoch, relative_tolerance, codebook_lr, codebook_optimizer, kmeans_iters, seed:
            the engine's settings, see `riverone_hf.aq.AqSettings`.
        calibration (`CalibrationSpec` or dict, optional): local text for output-aware (XᵀX) quantization;
            data-free (XᵀX = identity) when absent.
        target_modules (`str` or `list[str]`, optional): the Linears to quantize, by peft's convention: one
            string is a regular expression `re.fullmatch`ed on full module names; a list names modules exactly or
            as a dotted suffix (`["down_proj"]`, `["mlp.down_proj"]`). Default: every Linear of the language model's decoder; the vision tower,
            projector, embeddings and lm_head are left alone unless matched here.
        modules_to_not_convert (`list[str]`, optional): module names never quantized, matched the way
            transformers' `should_convert_module` does (prefix at a module boundary, regex, or suffix).
        overrides (`list[ModuleOverride]`, optional): per-module scheme changes or skips; first match wins.
        true_sequential (`bool`, defaults to False): with calibration, quantize each block's Linears group by
            group in the order the block calls them (q/k/v, o_proj, gate/up, down_proj), each group's XᵀX
            collected with the groups before it already quantized (the AQLM paper's Alg. 1).
        block_finetune (`BlockFinetuneSpec` or dict): with calibration, fine-tune each quantized block's
            codebooks, scales, norms and biases (never the codes) towards the dense block's outputs;
            disabled by default. See `riverone_hf.stages.block_finetune.BlockFinetuneSpec`.
    """

    calibration: CalibrationSpec | None = field(
        default=None, metadata={"help": "Local text for XᵀX-aware quantization; data-free when absent."}
    )
    target_modules: str | list[str] | None = field(
        default=None, metadata={"help": "One regex (re.fullmatch on full names) or a list of names / dotted suffixes "
                                        "(peft's convention); default: the decoder's Linears."}
    )
    modules_to_not_convert: list[str] | None = field(
        default=None, metadata={"help": "Module names never quantized (transformers' should_convert_module rules)."}
    )
    overrides: list[ModuleOverride] = field(
        default_factory=list, metadata={"help": "Per-module scheme changes or skips; the first match wins."}
    )
    true_sequential: bool = field(
        default=False,
        metadata={"help": "With calibration: XᵀX of each Linear group taken after the earlier groups of its block "
                          "are quantized."},
    )
    block_finetune: BlockFinetuneSpec = field(
        default_factory=BlockFinetuneSpec,
        metadata={"help": "With calibration: fine-tune each quantized block to the dense block's outputs."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.calibration is not None:
            self.calibration = spec_from_dict(CalibrationSpec, self.calibration, "calibration")
        require_target_modules("target_modules", self.target_modules, allow_none=True)
        require(
            self.modules_to_not_convert is None
            or (isinstance(self.modules_to_not_convert, list) and all(isinstance(v, str) for v in self.modules_to_not_convert)),
            f"`modules_to_not_convert` must be a list of strings or None, got {self.modules_to_not_convert!r}",
        )
        for pattern in self.modules_to_not_convert or []:  # transformers' should_convert_module uses re.match
            require_regex("modules_to_not_convert[]", pattern)
            require_regex("modules_to_not_convert[]", rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))")  # as it is matched
        require(isinstance(self.overrides, list), f"`overrides` must be a list, got {self.overrides!r}")
        self.overrides = [spec_from_dict(ModuleOverride, o, "overrides[]") for o in self.overrides]
        self._check_calibrated_options()

    def _check_calibrated_options(self) -> None:
        """`true_sequential` and `block_finetune` (they need calibration)."""
        require_bool("true_sequential", self.true_sequential)
        self.block_finetune = spec_from_dict(BlockFinetuneSpec, self.block_finetune, "block_finetune")
        for name, on in (("true_sequential", self.true_sequential), ("block_finetune.enabled", self.block_finetune.enabled)):
            require(not on or self.calibration is not None, f"`{name}` needs `calibration` (calibration text), got none")

    def for_module(self, module_name: str) -> AqlmSpec | None:
        """This spec with the first matching override applied, or None when that override says skip."""
        for override in self.overrides:
            if override.matches(module_name):
                return None if override.skip else dataclasses.replace(self, **override.scheme_changes())
        return self


def _decoder_prefix(model: nn.Module) -> str:
    """Full name of the language model's decoder (the default scope of the stage)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, module in model.named_modules():
        if decoder is not None and module is decoder:
            return name
    raise ValueError(
        f"{type(model).__name__} exposes no language-model decoder (`get_decoder()`); "
        "set `aqlm.target_modules` to the Linears to quantize"
    )


def plan_modules(model: nn.Module, spec: AqlmSpec, claimed: set[str] = frozenset()) -> dict[str, AqlmSpec]:
    """Map each Linear to convert to the spec that applies to it (overrides resolved). Linears in
    `claimed` belong to an earlier stage and are left out.

    Raises ValueError, before any weight is touched, for a target regex that matches no Linear,
    a tied Linear, or a shape the scheme's group sizes do not divide.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if spec.target_modules is None:
        prefix = _decoder_prefix(model) + "."
        in_scope = [name for name in linears if name.startswith(prefix)]
    else:
        in_scope = modules_matching(linears, spec.target_modules, "aqlm.target_modules")
    _require_patterns_match(model, spec, in_scope)
    tied = tied_module_names(model)
    plan = {}
    for name in in_scope:
        if is_claimed(name, claimed):
            continue
        if not should_convert_module(name, spec.modules_to_not_convert):
            continue
        module_spec = spec.for_module(name)
        if module_spec is None:
            continue
        if name in tied:
            raise ValueError(
                f"`{name}` shares its weight with another module (tied weights); quantizing it is not supported. "
                "Leave it out of `aqlm.target_modules` or add it to `aqlm.modules_to_not_convert`"
            )
        linear = linears[name]
        if linear.in_features % module_spec.in_group_size or linear.out_features % module_spec.out_group_size:
            raise ValueError(
                f"`{name}` has shape out={linear.out_features}, in={linear.in_features}, not divisible by "
                f"out_group_size={module_spec.out_group_size} / in_group_size={module_spec.in_group_size}; "
                "change the scheme for it with an `aqlm.overrides` entry, or skip it (`skip: true`)"
            )
        plan[name] = module_spec
    if not plan:
        raise ValueError("the AQLM stage selected no Linear; check `aqlm.target_modules` and `modules_to_not_convert`")
    return plan


def _require_patterns_match(model: nn.Module, spec: AqlmSpec, in_scope: list[str]) -> None:
    """ValueError for an `overrides` pattern that matches no targeted Linear, or a `modules_to_not_convert`
    entry that matches no module at all (both are typos that would otherwise be silently ignored)."""
    for override in spec.overrides:
        if not any(override.matches(name) for name in in_scope):
            raise ValueError(
                f"`aqlm.overrides` pattern {override.pattern!r} matches no Linear the stage targets (re.fullmatch on "
                f"full module names); examples of names: {in_scope[:5]}"
            )
    if spec.modules_to_not_convert:
        names = [name for name, _ in model.named_modules() if name]
        for entry in spec.modules_to_not_convert:
            if all(should_convert_module(name, [entry]) for name in names):
                raise ValueError(
                    f"`aqlm.modules_to_not_convert` entry {entry!r} matches no module of {type(model).__name__} "
                    f"(transformers' should_convert_module rules); examples of names: {names[:5]}"
                )


def map_entry(spec: AqlmSpec) -> dict:
    """The `quantization_map` entry recorded for one converted module."""
    return {"stage": AqlmStage.name, **spec.scheme_dict()}


def rebuild_modules(model: nn.Module, entries: dict[str, dict]) -> None:
    """Replace the recorded Linears by empty `AqlmLinear`s (before a pre-quantized checkpoint loads)."""
    for name, entry in entries.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantization_map names `{name}`, which is a {type(linear).__name__}, not a Linear")
        replacement = AqlmLinear(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **{k: entry[k] for k in SCHEME_FIELDS},
        )
        model.set_submodule(name, replacement)


def quantize_linear(linear: nn.Linear, spec: AqlmSpec, xtx: torch.Tensor | None = None) -> AqlmLinear:
    """Quantize one loaded Linear (on its own device) into an `AqlmLinear` of the same dtype."""
    weight = linear.weight.detach()
    quantized = quantize_weight(weight.float(), xtx=xtx, settings=spec)
    bias = None if linear.bias is None else linear.bias.detach()
    return AqlmLinear.from_quantized(quantized, bias=bias, dtype=weight.dtype).to(weight.device)


def quantize_data_free(model: nn.Module, plan: dict[str, AqlmSpec]) -> dict[str, dict]:
    """Quantize every planned Linear with the weight-only objective; returns the quantization_map."""
    quantization_map = {}
    for name, spec in tqdm(plan.items(), desc="AQLM (data-free)", unit="layer"):
        logger.info("quantizing %s (data-free, %dx%d)", name, spec.num_codebooks, spec.nbits_per_codebook)
        model.set_submodule(name, quantize_linear(model.get_submodule(name), spec))
        quantization_map[name] = map_entry(spec)
    return quantization_map


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every `AqlmLinear` by an `nn.Linear` holding its dequantized weight."""
    names = [name for name, m in model.named_modules() if isinstance(m, AqlmLinear)]
    for name in names:
        module = model.get_submodule(name)
        with torch.no_grad():
            weight = module.dequantize()
            target_dtype = dtype or module.codebooks.dtype
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None,
                device=weight.device, dtype=target_dtype,
            )
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        model.set_submodule(name, linear)
    return len(names)


def quantize_calibrated(
    model: nn.Module,
    plan: dict[str, AqlmSpec],
    windows: torch.Tensor,
    *,
    true_sequential: bool = False,
    finetune: BlockFinetuneSpec | None = None,
) -> dict[str, dict]:
    """Quantize every planned Linear with XᵀX from calibration windows, block by block (group by group with
    `true_sequential`; each block then fine-tuned when `finetune` is enabled)."""
    from .sequential import quantize_sequentially  # imports optimum: only when calibrating

    def quantize(name: str, xtx: torch.Tensor | None) -> None:
        model.set_submodule(name, quantize_linear(model.get_submodule(name), plan[name], xtx))

    def skeleton(name: str) -> None:  # another rank quantizes `name` and broadcasts it into this module
        rebuild_modules(model, {name: map_entry(plan[name])})

    quantize_sequentially(model, list(plan), windows, quantize, "AQLM", true_sequential=true_sequential,
                          finetune=finetune, skeleton=skeleton)
    return {name: map_entry(spec) for name, spec in plan.items()}


class AqlmStage(CalibratedStage):
    """The AQLM stage (see the module docstring); registered in `riverone_hf.stages`."""

    name = "aqlm"
    spec_class = AqlmSpec
    required_packages = ()

    select = staticmethod(plan_modules)

    def apply(self, model: nn.Module, spec: AqlmSpec, plan: StagePlan) -> dict[str, dict]:
        if plan.windows is None:
            return quantize_data_free(model, plan.modules)
        return quantize_calibrated(model, plan.modules, plan.windows, true_sequential=spec.true_sequential,
                                   finetune=spec.block_finetune)

    def rebuild(self, model: nn.Module, entries: dict[str, dict]) -> None:
        rebuild_modules(model, entries)

    def check_entry(self, module_name: str, entry: dict) -> None:
        """ValueError naming the module and the field for a malformed `quantization_map` entry."""
        missing = [k for k in SCHEME_FIELDS if k not in entry]
        require(not missing, f"`quantization_map[{module_name!r}]` (aqlm) lacks field(s) {missing}")
        try:
            AqScheme(**{k: entry[k] for k in SCHEME_FIELDS})
        except ValueError as err:
            raise ValueError(f"`quantization_map[{module_name!r}]` (aqlm): {err}") from None

    def report(self, model: nn.Module, entries: dict[str, dict]) -> list[str]:
        schemes: dict[str, int] = {}
        for entry in entries.values():
            key = (f"{entry['num_codebooks']}x{entry['nbits_per_codebook']} "
                   f"g{entry['out_group_size']}x{entry['in_group_size']}")
            schemes[key] = schemes.get(key, 0) + 1
        return [f"AQLM stage: {len(entries)} Linears quantized; " + ", ".join(f"{n} at {k}" for k, n in schemes.items())]

    def dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> int:
        return dequantize_model(model, dtype)
