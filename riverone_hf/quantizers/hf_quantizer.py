"""`RiverOneHfQuantizer`: translates transformers' loading hooks into riverone_hf stage calls.

Dense checkpoint (`pre_quantized=False`): the plan is checked on the meta skeleton before any weight
loads (bad targets or shapes fail fast), the dense weights load as usual, and the stages compress
after loading. riverone checkpoint (`pre_quantized=True`): the recorded `quantization_map` rebuilds the
compressed modules on the meta skeleton, so the stored tensors load straight into them.
"""

from __future__ import annotations

import logging

import torch
from transformers.quantizers.base import HfQuantizer

from ..config import RiverOneConfig
from . import aqlm_stage

logger = logging.getLogger(__name__)


class RiverOneHfQuantizer(HfQuantizer):
    """The quantizer behind `quant_method: "riverone"`."""

    requires_calibration = False
    quantization_config: RiverOneConfig

    def __init__(self, quantization_config: RiverOneConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._aqlm_plan = None
        self._calibration_windows = None

    def validate_environment(self, *args, **kwargs):
        spec = self.quantization_config.aqlm
        if not self.pre_quantized and spec is not None and spec.calibration is not None:
            from .calibration_data import check_calibration_source

            check_calibration_source(spec.calibration)

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            converted = aqlm_stage.build_skeleton(model, self.quantization_config.quantization_map)
            logger.info("rebuilt %d AqlmLinear modules from the checkpoint's quantization_map", converted)
            return model
        spec = self.quantization_config.aqlm
        if spec is not None:
            self._aqlm_plan = aqlm_stage.plan_aqlm(model, spec)
            logger.info("AQLM stage will convert %d Linear modules", len(self._aqlm_plan))
            if spec.calibration is not None:
                self._calibration_windows = _calibration_windows(model, spec.calibration)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized or self._aqlm_plan is None:
            return model
        if self._calibration_windows is None:
            new_map = aqlm_stage.quantize_data_free(model, self._aqlm_plan)
        else:
            new_map = aqlm_stage.quantize_calibrated(model, self._aqlm_plan, self._calibration_windows)
        self.quantization_config.quantization_map.update(new_map)
        self._aqlm_plan = self._calibration_windows = None
        return model

    def _dequantize(self, model, dtype=None):
        aqlm_stage.dequantize_model(model, dtype=dtype)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _calibration_windows(model, calibration):
    """Token windows [num_samples, seq_len] from the configured text, tokenised by the model's tokenizer."""
    from transformers import AutoTokenizer

    from ..evaluation import token_windows
    from .calibration_data import load_calibration_texts

    tokenizer_path = calibration.tokenizer or model.config.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"calibration needs a tokenizer; none could be loaded from {tokenizer_path!r} "
            "(set `aqlm.calibration.tokenizer`)"
        ) from err
    texts = load_calibration_texts(calibration)
    with torch.device("cpu"):  # this hook runs inside the loader's meta-device context
        return token_windows(tokenizer, texts, calibration.num_samples, calibration.seq_len, calibration.seed)
