"""`RiverOneHfQuantizer`: translates transformers' loading hooks into riverone_hf stage calls.

Dense checkpoint (`pre_quantized=False`): every configured stage plans on the meta skeleton before
any weight loads (bad targets or shapes fail fast), the dense weights load as usual, and the stages
compress after loading, in `STAGES` order; each records what it did in `quantization_map`.
riverone checkpoint (`pre_quantized=True`): each stage rebuilds its recorded modules on the meta
skeleton, so the stored tensors load straight into them.

A stage is a module with `plan(model, spec, claimed) -> plan` (the plan has `.claimed`, the module
names it takes, so later stages leave them alone), `apply(model, spec, plan) -> map entries` and
`rebuild(model, entries)`.
"""

from __future__ import annotations

import importlib
import logging

from transformers.quantizers.base import HfQuantizer

from ..config import STAGE_SPECS, RiverOneConfig

logger = logging.getLogger(__name__)

# Stage name -> module implementing it, in the order of `config.STAGE_SPECS`.
STAGES = {
    "minivit": "riverone_hf.stages.minivit",
    "vqc": "riverone_hf.stages.vqc",
    "aqlm": "riverone_hf.stages.aqlm",
}


def _stage(name: str):
    if name not in STAGES:
        raise ValueError(f"stage {name!r} is not implemented in this version; implemented: {sorted(STAGES)}")
    return importlib.import_module(STAGES[name])


class RiverOneHfQuantizer(HfQuantizer):
    """The quantizer behind `quant_method: "riverone"`."""

    requires_calibration = False
    quantization_config: RiverOneConfig

    def __init__(self, quantization_config: RiverOneConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._plans: dict[str, object] = {}

    def _configured(self) -> list[tuple[str, object]]:
        return [(n, getattr(self.quantization_config, n)) for n in STAGE_SPECS if getattr(self.quantization_config, n)]

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            stages = {entry.get("stage") for entry in self.quantization_config.quantization_map.values()}
            for name in sorted(stages):
                _stage(name)
            return
        for name, _ in self._configured():
            _stage(name)
        aqlm = self.quantization_config.aqlm
        if aqlm is not None and aqlm.calibration is not None:
            from ..stages.calibration_data import check_calibration_source

            check_calibration_source(aqlm.calibration)

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            entries_by_stage: dict[str, dict] = {}
            for module_name, entry in self.quantization_config.quantization_map.items():
                entries_by_stage.setdefault(entry["stage"], {})[module_name] = entry
            for name in STAGE_SPECS:
                if name in entries_by_stage:
                    _stage(name).rebuild(model, entries_by_stage[name])
                    logger.info("%s: rebuilt %d modules from quantization_map", name, len(entries_by_stage[name]))
            return model
        claimed: set[str] = set()
        for name, spec in self._configured():
            plan = _stage(name).plan(model, spec, claimed)
            claimed |= plan.claimed
            self._plans[name] = plan
            logger.info("%s stage will convert %d modules", name, len(plan.claimed))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, spec in self._configured():
            if name in self._plans:
                entries = _stage(name).apply(model, spec, self._plans.pop(name))
                self.quantization_config.quantization_map.update(entries)
        return model

    def _dequantize(self, model, dtype=None):
        from ..stages import aqlm as aqlm_stage

        aqlm_stage.dequantize_model(model, dtype=dtype)
        if any(entry.get("stage") == "vqc" for entry in self.quantization_config.quantization_map.values()):
            from ..stages import vqc as vqc_stage

            vqc_stage.dequantize_model(model)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True
