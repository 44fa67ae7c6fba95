"""The AQLM stage: which Linears it converts, the skeleton for pre-quantized loads, on-the-fly
quantization of loaded dense weights (data-free or calibrated), and dequantization back to Linears.

Stage protocol (see `hf_quantizer.STAGES`): `plan` before weights load, `apply` after, `rebuild`
for pre-quantized checkpoints."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.quantizers.quantizers_utils import should_convert_module

from dataclasses import dataclass, field

from ..config import SCHEME_FIELDS, AqlmSpec
from ..modeling.aqlm_linear import AqlmLinear
from ..aq import quantize_weight
from .targeting import is_claimed, linears_matching, tied_module_names

logger = logging.getLogger(__name__)

STAGE = "aqlm"


def _decoder_prefix(model: nn.Module) -> str:
    """Full name of the language model's decoder (the default scope of the stage)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, module in model.named_modules():
        if decoder is not None and module is decoder:
            return name
    raise ValueError(
        f"{type(model).__name__} exposes no language-model decoder (`get_decoder()`); "
        "set `aqlm.target_modules` to the regexes of the Linears to quantize"
    )


@dataclass
class AqlmPlan:
    """What `apply` will do: the spec of each Linear to convert, and calibration windows (or None)."""

    modules: dict[str, AqlmSpec]
    windows: torch.Tensor | None = None
    claimed: set[str] = field(init=False)

    def __post_init__(self):
        self.claimed = set(self.modules)


def plan(model: nn.Module, spec: AqlmSpec, claimed: set[str] = frozenset()) -> AqlmPlan:
    """Check the stage against the (meta) model and tokenize calibration text, before weights load."""
    modules = plan_modules(model, spec, claimed)
    windows = None
    if spec.calibration is not None:
        from .calibration_data import calibration_windows

        windows = calibration_windows(model, spec.calibration, "aqlm")
    return AqlmPlan(modules, windows)


def apply(model: nn.Module, spec: AqlmSpec, plan: AqlmPlan) -> dict[str, dict]:
    """Quantize the planned Linears of the loaded model; returns their quantization_map entries."""
    if plan.windows is None:
        return quantize_data_free(model, plan.modules)
    return quantize_calibrated(model, plan.modules, plan.windows)


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
        in_scope = linears_matching(linears, spec.target_modules, "aqlm.target_modules")
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


def map_entry(spec: AqlmSpec) -> dict:
    """The `quantization_map` entry recorded for one converted module."""
    return {"stage": STAGE, **spec.scheme_dict()}


def rebuild(model: nn.Module, entries: dict[str, dict]) -> None:
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
    quantized = quantize_weight(weight.float(), xtx=xtx, spec=spec)
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


def quantize_calibrated(model: nn.Module, plan: dict[str, AqlmSpec], windows: torch.Tensor) -> dict[str, dict]:
    """Quantize every planned Linear with XᵀX from calibration windows, block by block."""
    from .sequential import quantize_sequentially

    def quantize(name: str, xtx: torch.Tensor | None) -> None:
        model.set_submodule(name, quantize_linear(model.get_submodule(name), plan[name], xtx))

    quantize_sequentially(model, list(plan), windows, quantize, "AQLM")
    return {name: map_entry(spec) for name, spec in plan.items()}
