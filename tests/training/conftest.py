"""Fixtures of the PV-Tuning tests: one tiny Qwen3 quantized once per session (per xdist worker)."""

import pytest
from transformers import AutoModelForCausalLM

import riverone_hf  # noqa: F401  (registers quant_method "riverone")
from riverone_hf import RiverOneConfig
from tests.tiny_models import FAST_AQLM, PV_SCHEME, char_tokenizer


@pytest.fixture(scope="session")
def pv_dirs(qwen3_dir, tmp_path_factory):
    """(dense dir, quantized riverone dir with the char tokenizer) of the tiny Qwen3, quantized 1x8 with the fast
    engine settings. Read them, never write into them."""
    quantized = tmp_path_factory.mktemp("pv") / "quantized"
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=RiverOneConfig(aqlm={**PV_SCHEME, **FAST_AQLM}))
    model.save_pretrained(quantized)
    char_tokenizer().save_pretrained(quantized)
    return qwen3_dir, str(quantized)
