"""`RiverOneHfQuantizer`: translates transformers' loading hooks into calls of the registered stages.

Dense checkpoint (`pre_quantized=False`): every configured stage plans on the meta skeleton before
any weight loads (bad targets or shapes fail fast), the dense weights load as usual, and the stages
compress after loading, in registry order; each records what it did in `quantization_map`.
riverone checkpoint (`pre_quantized=True`): the weight files must be safetensors and match the hashes
recorded at save time (`riverone_hf.integrity`), each stage rebuilds its recorded modules on the meta
skeleton, so the stored tensors load straight into them, and the load is all-or-nothing: a rebuilt
module or a Linear weight without its tensors in the files is an error, never random weights.
Saving records the hashes and the no-plugin guard tensor (see `riverone_hf.integrity`).
"""

from __future__ import annotations

import importlib.util
import json
import logging

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from .. import integrity
from ..config import RiverOneConfig, Stage, StagePlan, get_stage, registered_stages

logger = logging.getLogger(__name__)


def _missing_packages(stage: Stage) -> list[str]:
    """pip requirements of `stage` whose import name cannot be found."""
    missing = []
    for module, requirement in stage.required_packages:
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # sys.modules[module] is None: imports of it are blocked
            found = False
        if not found:
            missing.append(requirement)
    return missing


def _require_packages(stage: Stage) -> None:
    """ImportError with the pip command when a package `stage` needs is not installed."""
    missing = _missing_packages(stage)
    if missing:
        command = "pip install " + " ".join(f"'{r}'" for r in missing)
        raise ImportError(f"the riverone `{stage.name}` stage needs {missing}, which is not installed: {command}")


class RiverOneHfQuantizer(HfQuantizer):
    """The quantizer behind `quant_method: "riverone"`."""

    requires_calibration = False
    quantization_config: RiverOneConfig

    def __init__(self, quantization_config: RiverOneConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._plans: dict[str, StagePlan] = {}

    def _stages_in_use(self) -> list[Stage]:
        """The stages this load runs: the recorded ones for a riverone checkpoint, else the configured ones."""
        if self.pre_quantized:
            recorded = self.quantization_config.map_entries_by_stage()
            return [get_stage(name) for name in recorded]
        return [stage for stage, _ in self.quantization_config.stage_specs()]

    def validate_environment(self, *args, **kwargs):
        for stage in self._stages_in_use():
            _require_packages(stage)
        if not self.pre_quantized:
            for stage, spec in self.quantization_config.stage_specs():
                stage.check(spec)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            stored, metadata = _checked_checkpoint(checkpoint_files)
            _rebuild_recorded(model, self.quantization_config)
            if stored is not None:
                _require_complete(model, self.quantization_config, stored)
            self._guard_module = _install_guard(model, metadata)
            return model
        claimed: set[str] = set()
        for stage, spec in self.quantization_config.stage_specs():
            plan = stage.plan(model, spec, claimed)
            claimed |= plan.claimed
            self._plans[stage.name] = plan
            logger.info("%s stage will convert %d modules", stage.name, len(plan.modules))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        guard = getattr(self, "_guard_module", None)
        if guard is not None:
            _remove_guard(model, guard)
            self._guard_module = None
        for stage, spec in self.quantization_config.stage_specs():
            if stage.name in self._plans:
                entries = stage.apply(model, spec, self._plans.pop(stage.name))
                self.quantization_config.quantization_map.update(entries)
        return model

    def _dequantize(self, model, dtype=None):
        for stage in reversed(registered_stages().values()):
            count = stage.dequantize(model, dtype)
            if count:
                logger.info("%s: dequantized %d modules", stage.name, count)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    def get_state_dict_and_metadata(self, model):
        """The state dict plus the guard tensor; metadata: the sha256 of every tensor as it will be stored."""
        return _state_dict_with_integrity(model, self.quantization_config)

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        """`Trainer` accepts a riverone model without adapters: codebooks, scales and norms are trainable
        parameters and `riverone_hf.training.PVTrainer` updates the codes (a property: transformers reads it as one)."""
        return True


def add_stages(model: nn.Module, config: RiverOneConfig) -> dict[str, dict]:
    """Compress a loaded riverone model further: run the stages configured in `config` on it, in registry order,
    and record them in the model's own `RiverOneConfig`, so one `save_pretrained` writes all stages.

    This is how a pipeline saves and evaluates after every stage (`recipes/riverone_qc.py`): load the dense
    model with the first stage's config, then add the next stages one by one (or resume from a saved stage).
    Modules the model's earlier stages converted stay theirs. Every stage plans (targets, shapes, calibration
    files) before any of them changes a weight. Returns the new `quantization_map` entries.
    Raises ValueError for a model not loaded through riverone, or a stage it already went through.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, RiverOneHfQuantizer):
        raise ValueError("`model` was not loaded through riverone: load it with `from_pretrained(..., "
                         "quantization_config=RiverOneConfig(...))` or from a riverone checkpoint first")
    own = quantizer.quantization_config
    done = set(own.map_entries_by_stage()) | {stage.name for stage, _ in own.stage_specs()}
    stages = config.stage_specs()
    for stage, spec in stages:
        if stage.name in done:
            raise ValueError(f"the model already went through the `{stage.name}` stage; a stage runs once")
        _require_packages(stage)
        stage.check(spec)
    claimed = set(own.quantization_map)
    plans = []
    for stage, spec in stages:
        plan = stage.plan(model, spec, claimed)
        claimed |= plan.claimed
        plans.append(plan)
    added: dict[str, dict] = {}
    for (stage, spec), plan in zip(stages, plans):
        entries = stage.apply(model, spec, plan)
        setattr(own, stage.name, spec)
        own.quantization_map.update(entries)
        added.update(entries)
        logger.info("%s stage added: %d modules", stage.name, len(entries))
    model.config.quantization_config = own
    return added



# ---- loading: files, map, completeness, guard -------------------------------------------------------------


def _checked_checkpoint(files) -> tuple[set[str] | None, dict[str, str]]:
    """(stored tensor names, riverone metadata) of the checkpoint files; refuses pickles, checks hashes."""
    files = [str(f) for f in files or []]
    if not files:
        return None, {}
    integrity.refuse_pickles(files)
    if integrity.verification_enabled():
        report = integrity.verify_files(files)
        stored = report["keys"]
        if not report["hashed"]:
            logger.info("checkpoint saved without riverone hashes (older format): only its structure is checked")
    else:
        stored = set()
        for path in files:
            stored |= {k for k in integrity.read_header(path)[0] if k != "__metadata__"}
    metadata: dict[str, str] = {}
    for path in files:
        metadata.update({k: v for k, v in integrity.file_metadata(path).items() if k.startswith("riverone.")})
    return stored, metadata


def _rebuild_recorded(model, config: RiverOneConfig) -> None:
    """Each stage rebuilds its `quantization_map` entries; a malformed entry is a ValueError naming it."""
    modules = dict(model.named_modules())
    absent = [name for name in config.quantization_map if name not in modules]
    if absent:
        raise ValueError(f"quantization_map names module(s) {absent[:10]} that {type(model).__name__} does not have; "
                         "the config does not belong to this model (or was edited)")
    recorded = config.map_entries_by_stage()
    for name, stage in registered_stages().items():
        if name not in recorded:
            continue
        entries = recorded[name]
        try:
            stage.rebuild(model, entries)
        except KeyError as err:
            field_name = err.args[0] if err.args else "?"
            culprits = [m for m, e in entries.items() if field_name not in e]
            raise ValueError(f"quantization_map entry `{(culprits or list(entries))[0]}` ({name} stage) lacks the "
                             f"field {field_name!r}") from None
        except (TypeError, AttributeError, IndexError, OverflowError, RuntimeError) as err:
            raise ValueError(f"quantization_map entries of the {name} stage are malformed "
                             f"({type(err).__name__}: {err})") from None
        logger.info("%s: rebuilt %d modules from quantization_map", name, len(entries))


def _file_names(model, keys: list[str]) -> dict[str, str]:
    """model state-dict key -> the name it has in the file (transformers may rename keys when saving)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - older transformers
        return {k: k for k in keys}
    names = {}
    for key in keys:
        try:
            reverted = revert_weight_conversion(model, {key: torch.empty(0, device="meta")})
        except Exception:  # noqa: BLE001 - a conversion that needs several keys: keep the name
            reverted = {key: None}
        names[key] = next(iter(reverted)) if len(reverted) == 1 else key
    return names


def _require_complete(model, config: RiverOneConfig, stored: set[str]) -> None:
    """Raise unless every tensor of every rebuilt module, and every Linear's weight, is in the files."""
    state_keys = list(model.state_dict().keys())
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    rebuilt = list(config.quantization_map)
    needed = []
    for key in state_keys:
        module_name = key.rpartition(".")[0]
        under_map = any(key.startswith(m + ".") for m in rebuilt)
        if under_map:
            needed.append(key)
            continue
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        if isinstance(module, nn.Linear) and key.endswith(".weight") and key.count(".") == module_name.count(".") + 1:
            needed.append(key)
    names = _file_names(model, needed)
    missing = []
    for key in needed:
        if names[key] in stored or key in stored:
            continue
        source = tied.get(key)
        if source is not None and (_file_names(model, [source])[source] in stored or source in stored):
            continue  # a tied copy: stored once under its source
        missing.append(names[key])
    if missing:
        raise ValueError(
            f"riverone checkpoint is incomplete: {len(missing)} tensor(s) of modules it needs are missing from the "
            f"weight files (they would be left uninitialised): {missing[:20]}. Re-save the model, or restore the files."
        )


def _install_guard(model, metadata: dict[str, str]) -> str | None:
    """Give the guard's module a `weight` buffer of the guard's shape, so the stored guard loads into it."""
    module_name = metadata.get(integrity.GUARD_MODULE_KEY)
    if not module_name:
        return None
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"the checkpoint's guard names module `{module_name}`, which the model lacks") from None
    if hasattr(module, integrity.GUARD_SUFFIX):
        raise ValueError(f"the checkpoint's guard module `{module_name}` already has a `weight`; was "
                         "quantization_map edited?")
    device = next(iter(module.buffers()), torch.empty(0, device="meta")).device
    module.register_buffer(integrity.GUARD_SUFFIX, torch.empty(len(integrity.GUARD_BYTES), dtype=torch.uint8,
                                                               device=device))
    return module_name


def _remove_guard(model, module_name: str) -> None:
    module = model.get_submodule(module_name)
    value = module._buffers.pop(integrity.GUARD_SUFFIX, None)
    if value is not None and not value.is_meta and bytes(value.cpu().tolist()) != integrity.GUARD_BYTES:
        raise integrity.IntegrityError(f"the checkpoint's guard tensor `{module_name}.weight` is corrupt")


# ---- saving ------------------------------------------------------------------------------------------------


def _guard_module(model, config: RiverOneConfig) -> str | None:
    """A leaf module the map rebuilt from a Linear (AQLM, VQC) that has no `weight` of its own: the guard goes
    under the dense Linear's weight name. None when there is none (a MiniViT-only checkpoint: no guard)."""
    for name in config.quantization_map:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if not any(True for _ in module.children()) and not hasattr(module, integrity.GUARD_SUFFIX):
            return name
    return None


def _state_dict_with_integrity(model, config: RiverOneConfig):
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state_dict = model.state_dict()
    guard = _guard_module(model, config)
    if guard is not None:
        state_dict[f"{guard}.{integrity.GUARD_SUFFIX}"] = integrity.guard_tensor()
    as_stored = remove_tied_weights_from_state_dict(dict(state_dict), model)
    try:
        from transformers.core_model_loading import revert_weight_conversion

        as_stored = revert_weight_conversion(model, as_stored)
    except ImportError:  # pragma: no cover - older transformers
        pass
    hashes = {name: integrity.tensor_digest(tensor) for name, tensor in as_stored.items()}
    metadata = {
        integrity.MANIFEST_KEY: json.dumps(hashes, sort_keys=True),
        integrity.FORMAT_KEY: integrity.FORMAT_VERSION,
    }
    if guard is not None:
        metadata[integrity.GUARD_MODULE_KEY] = guard
    return state_dict, metadata
