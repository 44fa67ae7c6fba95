"""Fixtures of the reliability suite: one small riverone checkpoint (2 AQLM Linears of a tiny Qwen3),
saved once per worker; tests copy it before damaging it."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import riverone_hf  # noqa: F401
from riverone_hf import RiverOneConfig
from tests.tiny_models import FAST_AQLM, input_ids

TARGETS = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def small_config() -> RiverOneConfig:
    return RiverOneConfig(aqlm={**FAST_AQLM, "target_modules": TARGETS})


@pytest.fixture(scope="session")
def riverone_ckpt(qwen3_dir, tmp_path_factory):
    """(path, logits) of a saved riverone checkpoint and its reference logits. Read only: copy it first."""
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=small_config())
    out = tmp_path_factory.mktemp("riverone") / "ckpt"
    model.save_pretrained(out)
    with torch.no_grad():
        logits = model(input_ids()).logits
    return str(out), logits


@pytest.fixture
def ckpt_copy(riverone_ckpt, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(riverone_ckpt[0], path)
    return path
