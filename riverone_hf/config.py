"""`RiverOneConfig`, and the registry of compression stages it is built from.

A stage is one object (the `Stage` protocol): its name (the config key and the `"stage"` of its
`quantization_map` entries), its spec dataclass, the packages it needs, and `check/plan/apply/rebuild/
report/dequantize`. Stages register once with `register_stage` (duplicates are refused), in the order they are
applied to a model; `riverone_hf.stages` registers the built-in ones (MiniViT, VQC, AQLM). The config,
the quantizer and `model.dequantize()` iterate the registry, so adding a stage is one file in `stages/`
and one registration line in `stages/__init__.py`.

`RiverOneConfig` is a transformers `QuantizationConfigMixin` (quant_method ``"riverone"``), so
`from_pretrained(..., quantization_config=RiverOneConfig(...))` and a saved `config.json` both carry it.
Each spec validates its fields in `__post_init__` and raises `ValueError` naming the field, the bad value
and what is allowed, before any work starts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from .validation import require, require_int, spec_from_dict, spec_to_dict

QUANT_METHOD = "riverone"
CONFIG_VERSION = 1


@dataclass
class StagePlan:
    """What a stage's `apply` will do, decided on the meta skeleton before any weight loads.

    Args:
        modules: the module names the stage converts (a dict when each carries its own setting).
        windows: calibration token windows [num_samples, seq_len], or None (data-free).
        claimed: names later stages must leave alone; defaults to the keys of `modules`.
    """

    modules: dict[str, Any] | list[str]
    windows: Any = None
    claimed: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.claimed = set(self.claimed) or set(self.modules)


@runtime_checkable
class Stage(Protocol):
    """One compression stage. `name` keys both `RiverOneConfig` and the stage's `quantization_map` entries.

    `required_packages` lists (import name, pip requirement) pairs that any use of the stage needs.
    """

    name: str
    spec_class: type
    required_packages: tuple[tuple[str, str], ...]

    def check(self, spec) -> None:
        """Raise now, before weights load, for anything outside the model that `spec` needs (files, packages)."""

    def plan(self, model: nn.Module, spec, claimed: set[str]) -> StagePlan:
        """Check `spec` against the (meta) model; ValueError before any weight loads. `claimed`: modules an
        earlier stage takes."""

    def apply(self, model: nn.Module, spec, plan: StagePlan) -> dict[str, dict]:
        """Compress the loaded model as planned; returns the `quantization_map` entries it made."""

    def rebuild(self, model: nn.Module, entries: dict[str, dict]) -> None:
        """Re-create the recorded modules on the meta skeleton of a riverone checkpoint, before it loads."""

    def report(self, model: nn.Module, entries: dict[str, dict]) -> list[str]:
        """Lines describing what the stage did to `model` (its `entries`), for the commands that print them."""

    def dequantize(self, model: nn.Module, dtype=None) -> int:
        """Replace this stage's modules with plain ones computing the same function (in `dtype`, default:
        the module's own); returns how many."""


_STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    """Add `stage` to the registry (after the ones registered before it: that is the order of application).

    Raises ValueError for a name or spec class already registered by another stage, TypeError for an object
    that is not a `Stage`; registering the same stage class again (a module reload) replaces it in place.
    Returns `stage`.
    """
    if not isinstance(stage, Stage):
        missing = [a for a in ("name", "spec_class", "required_packages", "check", "plan", "apply", "rebuild",
                               "report", "dequantize") if not hasattr(stage, a)]
        raise TypeError(f"{type(stage).__name__} is not a riverone Stage; it lacks {missing}")
    require(isinstance(stage.name, str) and stage.name.isidentifier() and stage.name.islower(),
            f"stage name must be a lowercase identifier, got {stage.name!r}")
    require(stage.name not in ("quantization_map", "version", "quant_method"),
            f"stage name {stage.name!r} is reserved by RiverOneConfig")
    existing = _STAGES.get(stage.name)
    if existing is not None and _qualname(type(existing)) == _qualname(type(stage)):
        _STAGES[stage.name] = stage  # the same stage again (a module reload): keep its place
        return stage
    require(existing is None, f"a stage named {stage.name!r} is already registered ({_qualname(type(existing))})")
    taken = [s.name for s in _STAGES.values() if s.spec_class is stage.spec_class]
    require(not taken, f"spec class {stage.spec_class.__name__} already belongs to stage {taken}")
    _STAGES[stage.name] = stage
    return stage


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_stages() -> dict[str, Stage]:
    """Name -> stage, in the order of application (a copy)."""
    return dict(_STAGES)


def get_stage(name: str) -> Stage:
    """The registered stage `name`; ValueError listing the registered ones otherwise."""
    require(name in _STAGES, f"unknown stage {name!r}; registered stages: {list(_STAGES)}")
    return _STAGES[name]


class RiverOneConfig(QuantizationConfigMixin):
    """Quantization config of riverone_hf: one optional spec per registered stage.

    Args:
        aqlm (`AqlmSpec` or dict, optional): additive quantization of Linear layers.
        minivit (`MiniViTSpec` or dict, optional): weight multiplexing of vision blocks.
        vqc (`VqcSpec` or dict, optional): VQC-generated Linears.
        (one keyword per registered stage: see `registered_stages()`)
        quantization_map (`dict`, optional): written by riverone_hf after compression, one entry per
            converted module (``{"model.layers.0.mlp.up_proj": {"stage": "aqlm", "num_codebooks": 2, ...}}``);
            a pre-quantized load rebuilds exactly these modules before the weights load. Users leave it empty.
        version (`int`): format version of this config.
    """

    def __init__(self, quantization_map: dict[str, dict[str, Any]] | None = None, version: int = CONFIG_VERSION,
                 **stages):
        stages.pop("quant_method", None)
        unknown = sorted(set(stages) - set(_STAGES))
        require(not unknown, f"RiverOneConfig got unknown field(s) {unknown}; allowed: "
                f"{sorted([*_STAGES, 'quantization_map', 'version'])}")
        self.quant_method = QUANT_METHOD
        for name, stage in _STAGES.items():
            spec = stages.get(name)
            setattr(self, name, None if spec is None else spec_from_dict(stage.spec_class, spec, name))
        require_int("version", version, 1, CONFIG_VERSION)
        self.version = version
        require(quantization_map is None or isinstance(quantization_map, dict),
                f"`quantization_map` must be a dict or None, got {type(quantization_map).__name__}")
        self.quantization_map = dict(quantization_map or {})
        for module_name, entry in self.quantization_map.items():
            check_map_entry(module_name, entry)
        require(any(spec is not None for _, spec in self.stage_specs()) or self.quantization_map,
                f"RiverOneConfig needs at least one stage; set one of {list(_STAGES)}")

    def stage_specs(self) -> list[tuple[Stage, Any]]:
        """(stage, spec) of every configured stage, in the order of application."""
        return [(stage, getattr(self, name)) for name, stage in _STAGES.items() if getattr(self, name) is not None]

    def map_entries_by_stage(self) -> dict[str, dict[str, dict]]:
        """`quantization_map` grouped by stage name (each group keeps the map's order)."""
        grouped: dict[str, dict[str, dict]] = {}
        for module_name, entry in self.quantization_map.items():
            grouped.setdefault(entry["stage"], {})[module_name] = entry
        return grouped

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": self.quant_method, "version": self.version}
        for name in _STAGES:
            spec = getattr(self, name)
            out[name] = None if spec is None else spec_to_dict(spec)
        out["quantization_map"] = copy.deepcopy(self.quantization_map)
        return out

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other) -> bool:
        return isinstance(other, RiverOneConfig) and self.to_dict() == other.to_dict()


def check_map_entry(module_name: Any, entry: Any) -> None:
    """ValueError naming the module and the field for a malformed `quantization_map` entry: the entry must be a
    dict whose `"stage"` is a registered stage; a stage with a `check_entry(name, entry)` checks its own fields."""
    require(isinstance(module_name, str) and module_name != "",
            f"`quantization_map` keys must be non-empty module names, got {module_name!r}")
    require(isinstance(entry, dict), f"`quantization_map[{module_name!r}]` must be a dict, got {type(entry).__name__}")
    stage_name = entry.get("stage")
    require(isinstance(stage_name, str) and stage_name in _STAGES,
            f"`quantization_map[{module_name!r}].stage`: unknown stage {stage_name!r}; registered stages: "
            f"{list(_STAGES)} (a stage from a plugin that is not imported?)")
    check = getattr(_STAGES[stage_name], "check_entry", None)
    if check is not None:
        check(module_name, entry)


def load_config_file(path: str) -> RiverOneConfig:
    """Read a `RiverOneConfig` from a YAML (or JSON) file whose top-level keys are the config's fields."""
    import yaml

    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    require(isinstance(data, dict), f"{path}: expected a mapping of RiverOneConfig fields, got {type(data).__name__}")
    return RiverOneConfig.from_dict(data)
