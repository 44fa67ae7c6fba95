"""The stage registry: built-in order, duplicate refusal, a new stage plugged in as one object, the
ImportError naming the pip command, and a checkpoint saved before the registry redesign still loading."""

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import riverone_hf  # noqa: F401  (registers quant_method "riverone" and the built-in stages)
from riverone_hf import RiverOneConfig, StagePlan, config as config_module
from riverone_hf.config import register_stage, registered_stages
from riverone_hf.stages import AqlmStage

LEGACY = pathlib.Path(__file__).resolve().parents[1] / "data" / "legacy_v1_all_stages"


def test_built_in_stages_in_order_of_application():
    assert list(registered_stages()) == ["minivit", "vqc", "aqlm"]


def test_duplicates_and_non_stages_are_refused():
    class OtherAqlm(AqlmStage):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_stage(OtherAqlm())
    with pytest.raises(TypeError, match="not a riverone Stage"):
        register_stage(object())
    register_stage(AqlmStage())  # the same stage again (a module reload) keeps its place
    assert list(registered_stages()) == ["minivit", "vqc", "aqlm"]


class ScaleSpec:
    """A toy spec: multiply the weight of the Linears named in `targets` by `factor`."""

    def __init__(self, targets, factor=2.0):
        self.targets, self.factor = targets, factor


class ScaleStage:
    """A complete stage in a few lines: what `register_stage` asks of a new stage."""

    name = "scale"
    spec_class = ScaleSpec
    required_packages = (("riverone_no_such_package", "riverone-no-such-package>=1"),)

    def check(self, spec):
        pass

    def plan(self, model, spec, claimed):
        return StagePlan(list(spec.targets))

    def apply(self, model, spec, plan):
        return {name: {"stage": self.name} for name in plan.modules}

    def rebuild(self, model, entries):
        pass

    def report(self, model, entries):
        return [f"scale: {len(entries)}"]

    def dequantize(self, model, dtype=None):
        return 0


@pytest.fixture
def scale_stage(monkeypatch):
    monkeypatch.setattr(config_module, "_STAGES", dict(config_module._STAGES))
    register_stage(ScaleStage())
    return ScaleStage


def test_a_registered_stage_is_a_config_field_and_needs_its_packages(scale_stage, qwen3_dir):
    config = RiverOneConfig(scale=ScaleSpec(["model.layers.0.mlp.up_proj"]))
    assert list(registered_stages())[-1] == "scale" and config.scale.factor == 2.0
    with pytest.raises(ImportError, match=r"pip install 'riverone-no-such-package>=1'"):
        AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=config)


def test_unknown_stage_in_a_checkpoint_is_named(qwen3_dir, tmp_path):
    config = json.loads((pathlib.Path(qwen3_dir) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "riverone", "quantization_map": {"lm_head": {"stage": "zip"}}}
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        source = pathlib.Path(qwen3_dir) / name
        if source.exists():
            (tmp_path / name).write_bytes(source.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown stage 'zip'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_saved_before_the_redesign_loads_with_identical_outputs():
    """tests/data/legacy_v1_all_stages: MiniViT + VQC + AQLM on a tiny InternVL, saved by commit 89d8f87."""
    model = AutoModelForImageTextToText.from_pretrained(LEGACY)
    expected = load_file(LEGACY / "expected_outputs.safetensors")
    stages = {e["stage"] for e in model.config.quantization_config.quantization_map.values()}
    assert stages == {"minivit", "vqc", "aqlm"}
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], pixel_values=expected["pixel_values"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.Linear) and "language_model.layers" in n for n, m in model.named_modules())
