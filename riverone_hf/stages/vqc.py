"""The VQC stage: swap the Linears that `vqc.target_modules` names for `VQCGeneratedLinear`s whose
weight a variational circuit + hypernetwork generates, fitted to the weight each one replaces.

Stage protocol (see `hf_quantizer.STAGES`): `plan` on the meta skeleton (bad regexes, ranks, claimed or
tied Linears fail here, before any weight loads), `apply` after the dense weights load, `rebuild` for
a riverone checkpoint. Order of stages: minivit -> vqc -> aqlm. A Linear (or anything inside a module)
that MiniViT claimed is left to MiniViT; a Linear VQC takes is in `plan.claimed`, so AQLM leaves it alone
(VQC wins over AQLM).

Importing this module raises ImportError with the pip command when PennyLane is missing: the quantizer's
`validate_environment` imports the stage of every configured or recorded stage, so a VQC config or
checkpoint fails there, first.

`apply` prints the accounting table (`modeling.vqc_accounting`): per layer, stored numbers against the
dense matrix and the relative error against the original weight, beside truncated SVD and the
classical-vector ablation at the same budget; each layer's row is also kept in its quantization_map
entry under "report".
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import VqcSpec
from ..modeling.vqc_circuit import require_pennylane
from .targeting import is_claimed, linears_matching, tied_module_names

require_pennylane("The VQC stage (riverone `vqc` config or checkpoint)")

from ..metrics.vqc_accounting import LayerAccount, account_layer, classical_twin, format_accounts
from ..modeling.vqc_linear import VQCGeneratedLinear

logger = logging.getLogger(__name__)

STAGE = "vqc"
REBUILD_FIELDS = ("in_features", "out_features", "bias", "n_wires", "n_layers", "rank", "hidden_size",
                  "chunk_size", "noise_probability", "exact_noise")


@dataclass
class VqcPlan:
    """What `apply` will do: the Linears to swap, and calibration windows (or None)."""

    modules: list[str]
    windows: torch.Tensor | None = None
    claimed: set[str] = field(init=False)

    def __post_init__(self):
        self.claimed = set(self.modules)


def plan_modules(model: nn.Module, spec: VqcSpec, claimed: set[str] = frozenset()) -> list[str]:
    """The Linears to swap. ValueError for a regex that matches no Linear, a tied Linear, a rank larger
    than a target's min(in, out), or when everything matched was claimed by an earlier stage."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    matched = linears_matching(linears, spec.target_modules, "vqc.target_modules")
    selected = [name for name in matched if not is_claimed(name, claimed)]
    if len(selected) < len(matched):
        logger.info("vqc: %d matched Linears belong to an earlier stage (minivit wins)", len(matched) - len(selected))
    if not selected:
        raise ValueError("every Linear matched by `vqc.target_modules` is already taken by the minivit stage")
    tied = tied_module_names(model) & set(selected)
    if tied:
        raise ValueError(f"{sorted(tied)} share their weight with another module (tied); leave them out of `vqc.target_modules`")
    for name in selected:
        linear = linears[name]
        if spec.rank > min(linear.in_features, linear.out_features):
            raise ValueError(
                f"`vqc.rank` {spec.rank} is larger than `{name}` allows: min(in={linear.in_features}, "
                f"out={linear.out_features}) = {min(linear.in_features, linear.out_features)}"
            )
    return selected


def plan(model: nn.Module, spec: VqcSpec, claimed: set[str] = frozenset()) -> VqcPlan:
    """Check the stage against the (meta) model and tokenize calibration text, before weights load."""
    require_pennylane()
    modules = plan_modules(model, spec, claimed)
    windows = None
    if spec.calibration is not None:
        from .calibration_data import calibration_windows, check_calibration_source

        check_calibration_source(spec.calibration)
        windows = calibration_windows(model, spec.calibration, "vqc")
    return VqcPlan(modules, windows)


def layer_seed(spec: VqcSpec, name: str) -> int:
    """A per-layer seed derived from `spec.seed` and the module name (reproducible, distinct per layer)."""
    return (spec.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def convert_linear(name: str, linear: nn.Linear, spec: VqcSpec,
                   xtx: torch.Tensor | None = None) -> tuple[VQCGeneratedLinear, LayerAccount]:
    """A `VQCGeneratedLinear` (float32 generator) replacing `linear`, fitted when `spec.init == "fit"`,
    and its accounting row."""
    seed = layer_seed(spec, name)
    module = VQCGeneratedLinear(
        linear.in_features, linear.out_features, bias=linear.bias is not None, n_wires=spec.n_wires,
        n_layers=spec.n_layers, rank=spec.rank, hidden_size=spec.hidden_size, chunk_size=spec.chunk_size,
        noise_probability=spec.noise_probability, exact_noise=spec.exact_noise, seed=seed,
        device=linear.weight.device, dtype=torch.float32,
    )
    if linear.bias is not None:
        with torch.no_grad():
            module.bias.copy_(linear.bias)
    weight = linear.weight.detach().float()
    classical = classical_twin(module, seed).to(weight.device) if spec.baselines else None
    if spec.init == "fit":
        for generator, label in ((module, "VQC"), (classical, "classical ablation")):
            if generator is not None:
                generator.fit_(weight, xtx, steps=spec.init_steps, lr=spec.init_lr, desc=f"{label} fit {name}")
    account = account_layer(name, module, weight, xtx, classical=classical)
    if account.vqc_params >= account.dense_params:
        logger.warning("vqc: the generator of %s stores %d numbers, not fewer than the dense %d",
                       name, account.vqc_params, account.dense_params)
    module.train(linear.training)
    return module, account


def map_entry(module: VQCGeneratedLinear, account: LayerAccount) -> dict:
    """The `quantization_map` entry of one swapped Linear: what `rebuild` needs, plus the accounting row."""
    report = {k: v for k, v in account.as_dict().items() if k not in ("name", "out_features", "in_features")}
    return {"stage": STAGE, **module.config_dict(), "report": report}


def apply(model: nn.Module, spec: VqcSpec, plan: VqcPlan) -> dict[str, dict]:
    """Swap and fit the planned Linears of the loaded model; print the accounting; return the map entries."""
    entries, accounts = {}, []

    def swap(name: str, xtx: torch.Tensor | None) -> None:
        module, account = convert_linear(name, model.get_submodule(name), spec, xtx)
        model.set_submodule(name, module)
        entries[name] = map_entry(module, account)
        accounts.append(account)

    if plan.windows is None:
        for name in tqdm(plan.modules, desc="VQC layers", unit="layer"):
            swap(name, None)
    else:
        from .sequential import quantize_sequentially

        quantize_sequentially(model, plan.modules, plan.windows, swap, "VQC")
    table = format_accounts(accounts)
    print("VQC stage: stored numbers vs dense; relative squared error vs the original weight (||ΔW||²/||W||², or "
          "||ΔW X||²/||W X||² with calibration); truncated SVD and the classical-vector ablation at the same budget\n"
          + table, flush=True)
    logger.info("vqc accounting:\n%s", table)
    return entries


def rebuild(model: nn.Module, entries: dict[str, dict]) -> None:
    """Replace the recorded Linears by empty `VQCGeneratedLinear`s (before a riverone checkpoint loads)."""
    require_pennylane()
    for name, entry in entries.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantization_map names `{name}`, which is a {type(linear).__name__}, not a Linear")
        shape = (entry["out_features"], entry["in_features"])
        if (linear.out_features, linear.in_features) != shape:
            raise ValueError(f"quantization_map records `{name}` as out x in {shape}, the model has "
                             f"{(linear.out_features, linear.in_features)}")
        kwargs = {k: entry[k] for k in REBUILD_FIELDS}
        model.set_submodule(name, VQCGeneratedLinear(**kwargs, device=linear.weight.device, dtype=torch.float32))


@torch.no_grad()
def dequantize_model(model: nn.Module, low_rank: bool = False) -> int:
    """Replace every `VQCGeneratedLinear` by its `merge_to_linear(low_rank)` export; returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, VQCGeneratedLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).merge_to_linear(low_rank=low_rank))
    return len(names)
