"""Fixtures for the Hub tests: a Hub-compatible server on 127.0.0.1 (tests/hub/hub_server.py), an
environment that points huggingface_hub at it (for subprocesses: HF_ENDPOINT is read at import), a fresh
HF_HOME per test, and tiny riverone checkpoints of every stage kind, measured (riverone_results.json)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import riverone_hf  # noqa: F401  (registers quant_method "riverone")
from riverone_hf import RiverOneConfig
from riverone_hf.metrics.evaluation import evaluate_checkpoint
from tests.hub.hub_server import TOKEN, HubServer
from tests.tiny_models import FAST_AQLM, char_tokenizer, input_ids, save_dense, tiny_internvl, tiny_qwen3

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAST_VQC = {"n_wires": 2, "n_layers": 1, "rank": 2, "hidden_size": 4, "chunk_size": 8, "init_steps": 3,
            "baselines": False}
SCHEME = {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8}
EVAL_TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 6
VISION_PIXELS_SEED = 3

# name -> (dense builder, Auto class, RiverOneConfig fields)
STAGE_KINDS = {
    "aqlm": (tiny_qwen3, AutoModelForCausalLM, {"aqlm": {**SCHEME, **FAST_AQLM}}),
    "minivit": (tiny_internvl, AutoModelForImageTextToText, {"minivit": {"groups": [[0, 1]]}}),
    "vqc": (tiny_qwen3, AutoModelForCausalLM,
            {"vqc": {"target_modules": ["model.layers.0.mlp.down_proj"], **FAST_VQC}}),
    "mixed": (tiny_internvl, AutoModelForImageTextToText,
              {"minivit": {"groups": [[0, 1]]}, "aqlm": {**SCHEME, **FAST_AQLM},
               "vqc": {"target_modules": ["language_model.layers.0.mlp.down_proj"], **FAST_VQC}}),
}


def reference_outputs(model) -> dict[str, torch.Tensor]:
    """What a reload must reproduce exactly: logits, and the vision tower's output for a VLM."""
    with torch.no_grad():
        out = {"logits": model(input_ids=input_ids()).logits.contiguous()}
        if hasattr(model.config, "vision_config"):
            pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(VISION_PIXELS_SEED))
            out["vision"] = model.model.vision_tower(pixel_values=pixels).last_hidden_state.contiguous()
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """`checkpoint(kind)` -> folder of a measured riverone checkpoint of that stage kind (built once per
    session, on first use), with `<kind>.reference.safetensors` beside it (outside the folder) holding its
    outputs."""
    root = tmp_path_factory.mktemp("hub_checkpoints")
    text = root / "held_out.txt"
    text.write_text(EVAL_TEXT)
    folders: dict[str, str] = {}

    def build(kind: str) -> str:
        if kind not in folders:
            make, auto, fields = STAGE_KINDS[kind]
            dense = save_dense(make(), root / f"{kind}-dense")
            model = auto.from_pretrained(dense, quantization_config=RiverOneConfig(**fields))
            out = root / kind
            model.save_pretrained(out)
            char_tokenizer().save_pretrained(out)
            save_file(reference_outputs(model), reference_path(str(out)))
            evaluate_checkpoint(str(out), str(text), seq_len=16, max_windows=4)
            folders[kind] = str(out)
        return folders[kind]

    return build


def reference_path(folder: str) -> str:
    return f"{folder}.reference.safetensors"


@pytest.fixture(scope="module")
def hub():
    server = HubServer()
    yield server
    server.close()


@pytest.fixture
def hub_env(hub, tmp_path, monkeypatch) -> dict[str, str]:
    """Environment for a subprocess that talks to `hub` (fresh HF_HOME), and the same settings in-process
    (huggingface_hub read HF_ENDPOINT at import, so its constant is patched too)."""
    from huggingface_hub import constants

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONPATH": REPO_ROOT, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HF_HUB_OFFLINE", None)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    return env


def run_python(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (huggingface_hub imported there reads `env`); raise with its output."""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=REPO_ROOT)
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
