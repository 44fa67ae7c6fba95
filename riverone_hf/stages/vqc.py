"""The VQC stage: swap the Linears that `vqc.target_modules` names for `VQCGeneratedLinear`s whose
weight a variational circuit + hypernetwork generates, fitted to the weight each one replaces.

`plan` runs on the meta skeleton (bad regexes, ranks, claimed or tied Linears fail there, before any
weight loads), `apply` after the dense weights load, `rebuild` for a riverone checkpoint. Order of
stages: minivit -> vqc -> aqlm. A Linear (or anything inside a module) that MiniViT claimed is left to
MiniViT; a Linear VQC takes is in its plan's `claimed`, so AQLM leaves it alone (VQC wins over AQLM).
PennyLane is needed (`required_packages`): the quantizer's `validate_environment` raises ImportError
with the pip command for a VQC config or checkpoint when it is missing.

`apply` logs the accounting table (`metrics.vqc_accounting`): per layer, stored numbers against the
dense matrix and the relative error against the original weight, beside truncated SVD and the
classical-vector ablation at the same budget; each layer's row is kept in its quantization_map entry
under "report", and `report()` formats them for the commands that print.
"""

from __future__ import annotations

import enum
import logging
import zlib
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import StagePlan
from ..metrics.vqc_accounting import LayerAccount, account_layer, classical_twin, format_accounts
from ..modeling.vqc_circuit import MAX_VQC_EXACT_NOISE_WIRES, MAX_VQC_WIRES
from ..modeling.vqc_linear import VQCGeneratedLinear
from ..validation import require, require_bool, require_choice, require_int, require_number, spec_from_dict
from .calibration_data import CalibratedStage, CalibrationSpec
from .targeting import is_claimed, modules_matching, require_target_modules, tied_module_names

logger = logging.getLogger(__name__)

REBUILD_FIELDS = ("in_features", "out_features", "bias", "n_wires", "n_layers", "rank", "hidden_size",
                  "chunk_size", "noise_probability", "exact_noise")


class VqcInit(str, enum.Enum):
    """How a swapped Linear's generator starts."""

    FIT = "fit"
    """least-squares warm start, then Adam, towards the replaced weight (or its outputs, with calibration)."""
    RANDOM = "random"
    """the seeded random initialisation, not fitted."""


@dataclass
class VqcSpec:
    """Swap chosen Linears for `VQCGeneratedLinear`: a variational circuit (PennyLane) whose
    measurements drive a chunked hypernetwork that generates the weight as low-rank factors W = U Vᵀ.
    The VQC stage runs after MiniViT and before AQLM: a Linear it takes is left alone by AQLM.

    Args:
        target_modules (`str` or `list[str]`): peft's convention: one regular expression `re.fullmatch`ed on full
            module names, or a list of names / dotted suffixes (`["mlp.fc2"]`); each must select a Linear.
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

    target_modules: str | list[str] = field(
        default_factory=list, metadata={"help": "One regex (re.fullmatch) or a list of names / dotted suffixes."}
    )
    n_wires: int = field(default=4, metadata={"help": f"Qubits, 1..{MAX_VQC_WIRES}."})
    n_layers: int = field(default=2, metadata={"help": "Circuit layers (RX, RY, RZ + CNOT ring), >= 1."})
    rank: int = field(default=8, metadata={"help": "Rank r of W = U Vᵀ, <= min(in, out) of each target."})
    hidden_size: int = field(default=32, metadata={"help": "Hypernetwork width, >= 1."})
    chunk_size: int = field(default=64, metadata={"help": "Rows of U / V emitted per chunk, >= 1."})
    noise_probability: float = field(default=0.0, metadata={"help": "Depolarizing noise in training, [0, 1)."})
    exact_noise: bool = field(default=False, metadata={"help": "Exact channel on default.mixed (slow)."})
    init: VqcInit = field(default=VqcInit.FIT, metadata={"help": "'fit' the generator to the replaced weight, or 'random'."})
    init_steps: int = field(default=200, metadata={"help": "Adam steps of the fit, >= 0."})
    init_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the fit, > 0."})
    calibration: CalibrationSpec | None = field(
        default=None, metadata={"help": "Local text; the fit then minimises the output error through XᵀX."}
    )
    baselines: bool = field(default=True, metadata={"help": "Fit the classical-vector ablation for the report."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, >= 0."})

    def __post_init__(self):
        require_target_modules("vqc.target_modules", self.target_modules, allow_none=False)
        require_int("vqc.n_wires", self.n_wires, 1, MAX_VQC_WIRES)
        require_int("vqc.n_layers", self.n_layers, 1, 1_000)
        require_int("vqc.rank", self.rank, 1, 1_000_000)
        require_int("vqc.hidden_size", self.hidden_size, 1, 1_000_000)
        require_int("vqc.chunk_size", self.chunk_size, 1, 1_000_000)
        require_number("vqc.noise_probability", self.noise_probability, 0, 1)
        require_bool("vqc.exact_noise", self.exact_noise)
        require(
            not self.exact_noise or self.n_wires <= MAX_VQC_EXACT_NOISE_WIRES,
            f"`vqc.n_wires` must be <= {MAX_VQC_EXACT_NOISE_WIRES} with `vqc.exact_noise` (default.mixed holds a "
            f"4^n_wires density matrix), got {self.n_wires}",
        )
        self.init = require_choice("vqc.init", self.init, VqcInit)
        require_int("vqc.init_steps", self.init_steps, 0, 10_000_000)
        require_number("vqc.init_lr", self.init_lr, 0, None, low_open=True)
        if self.calibration is not None:
            self.calibration = spec_from_dict(CalibrationSpec, self.calibration, "vqc.calibration")
        require_bool("vqc.baselines", self.baselines)
        require_int("vqc.seed", self.seed, 0, 2**63 - 1)



def plan_modules(model: nn.Module, spec: VqcSpec, claimed: set[str] = frozenset()) -> list[str]:
    """The Linears to swap. ValueError for a regex that matches no Linear, a tied Linear, a rank larger
    than a target's min(in, out), or when everything matched was claimed by an earlier stage."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    matched = modules_matching(linears, spec.target_modules, "vqc.target_modules")
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
    if spec.init == VqcInit.FIT:
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
    return {"stage": VqcStage.name, **module.config_dict(), "report": report}


def swap_linears(model: nn.Module, spec: VqcSpec, plan: StagePlan) -> tuple[dict[str, dict], list[LayerAccount]]:
    """Swap and fit the planned Linears of the loaded model; returns their map entries and accounting rows."""
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
        from .sequential import quantize_sequentially  # imports optimum: only when calibrating

        quantize_sequentially(model, plan.modules, plan.windows, swap, "VQC")
    return entries, accounts


ACCOUNTING_TITLE = ("VQC stage: stored numbers vs dense; relative squared error vs the original weight "
                    "(||ΔW||²/||W||², or ||ΔW X||²/||W X||² with calibration); truncated SVD and the "
                    "classical-vector ablation at the same budget")


class VqcStage(CalibratedStage):
    """The VQC stage (see the module docstring); registered in `riverone_hf.stages`."""

    name = "vqc"
    spec_class = VqcSpec
    required_packages = (("pennylane", "pennylane>=0.45"),)

    select = staticmethod(plan_modules)

    def apply(self, model: nn.Module, spec: VqcSpec, plan: StagePlan) -> dict[str, dict]:
        entries, accounts = swap_linears(model, spec, plan)
        logger.info("%s\n%s", ACCOUNTING_TITLE, format_accounts(accounts))
        return entries

    def check_entry(self, module_name: str, entry: dict) -> None:
        """ValueError naming the module and the field for a malformed `quantization_map` entry (the circuit
        fields are checked by `VqcSpec`'s own rules)."""
        where = f"quantization_map[{module_name!r}]"
        missing = [k for k in (*REBUILD_FIELDS, "report") if k not in entry]
        require(not missing, f"`{where}` (vqc) lacks field(s) {missing}")
        require_int(f"{where}.in_features", entry["in_features"], 1, 2**31)
        require_int(f"{where}.out_features", entry["out_features"], 1, 2**31)
        require_bool(f"{where}.bias", entry["bias"])
        require(isinstance(entry["report"], dict), f"`{where}.report` must be a dict, got {entry['report']!r}")
        circuit = {k: entry[k] for k in REBUILD_FIELDS if k not in ("in_features", "out_features", "bias")}
        try:
            VqcSpec(target_modules=[module_name], init="random", baselines=False, **circuit)
        except ValueError as err:
            raise ValueError(f"`{where}` (vqc): {err}") from None

    def rebuild(self, model: nn.Module, entries: dict[str, dict]) -> None:
        """Replace the recorded Linears by empty `VQCGeneratedLinear`s (before a riverone checkpoint loads)."""
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
    def dequantize(self, model: nn.Module, dtype=None) -> int:
        """Replace every `VQCGeneratedLinear` by the `nn.Linear` of its generated weight; returns how many."""
        names = [name for name, m in model.named_modules() if isinstance(m, VQCGeneratedLinear)]
        for name in names:
            model.set_submodule(name, model.get_submodule(name).merge_to_linear(dtype=dtype))
        return len(names)

    def report(self, model: nn.Module, entries: dict[str, dict]) -> list[str]:
        accounts = [LayerAccount(name=name, out_features=e["out_features"], in_features=e["in_features"],
                                 **e["report"]) for name, e in entries.items()]
        return [ACCOUNTING_TITLE, format_accounts(accounts)]
