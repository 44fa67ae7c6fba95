"""The VQC stage through from_pretrained: swap by regex on tiny Qwen3 / InternVL, accounting, save ->
reload identical, composition with AQLM (VQC wins), checks on the meta skeleton, missing PennyLane."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import riverone_hf  # noqa: F401  (registers quant_method "riverone")
from riverone_hf import AqlmLinear, RiverOneConfig
from riverone_hf import VqcSpec
from riverone_hf.cli.demo_assets import shipped_text_path
from riverone_hf.modeling import VQCGeneratedLinear
from riverone_hf.stages import vqc as vqc_stage
from tests.tiny_models import FAST_AQLM, input_ids, save_dense, tiny_internvl, tiny_qwen3

FAST_VQC = {"n_wires": 2, "n_layers": 1, "rank": 2, "hidden_size": 4, "chunk_size": 8, "init_steps": 3}
QWEN_DOWN = r"model\.layers\.\d+\.mlp\.down_proj"
VISION_FC2 = r"model\.vision_tower\.encoder\.layer\.\d+\.mlp\.fc2"
LLM_DOWN_0 = r"model\.language_model\.layers\.0\.mlp\.down_proj"


def swapped(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, VQCGeneratedLinear)}


def logits(model):
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def vision_hidden(model):
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.model.vision_tower(pixel_values=pixels).last_hidden_state


@pytest.fixture(scope="module")
def vqc_qwen3(qwen3_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(
        qwen3_dir, quantization_config=RiverOneConfig(vqc={"target_modules": QWEN_DOWN, **FAST_VQC})
    )
    out = tmp_path_factory.mktemp("qwen3") / "vqc"
    model.save_pretrained(out)
    return model, str(out)


def test_qwen3_swaps_by_regex_below_dense(vqc_qwen3):
    model, out = vqc_qwen3
    assert swapped(model) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    entries = json.loads((pathlib.Path(out) / "config.json").read_text())["quantization_config"]["quantization_map"]
    for name in swapped(model):
        module = model.get_submodule(name)
        report = entries[name]["report"]
        assert entries[name]["stage"] == "vqc" and entries[name]["n_wires"] == 2
        assert module.num_generator_parameters() == report["vqc_params"] < report["dense_params"] == 64 * 128
        assert report["svd_params"] <= report["vqc_params"] and report["classical_error"] is not None


def test_qwen3_reload_gives_identical_outputs(vqc_qwen3):
    model, out = vqc_qwen3
    again = AutoModelForCausalLM.from_pretrained(out)
    assert swapped(again) == swapped(model)
    assert not again.training
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_dequantize_merges_to_linears_with_the_same_outputs(vqc_qwen3):
    _, out = vqc_qwen3
    model = AutoModelForCausalLM.from_pretrained(out)
    reference = logits(model)
    assert vqc_stage.VqcStage().dequantize(model) == 2 and not swapped(model)
    torch.testing.assert_close(logits(model), reference, rtol=1e-4, atol=1e-5)


def test_internvl_vision_and_llm_with_aqlm_in_one_config(tmp_path):
    dense = save_dense(tiny_internvl(), tmp_path / "dense")
    config = RiverOneConfig(
        vqc={"target_modules": f"{VISION_FC2}|{LLM_DOWN_0}", **FAST_VQC},
        aqlm={"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8, **FAST_AQLM},
    )
    model = AutoModelForImageTextToText.from_pretrained(dense, quantization_config=config)
    vision = {f"model.vision_tower.encoder.layer.{i}.mlp.fc2" for i in range(2)}
    assert swapped(model) == vision | {"model.language_model.layers.0.mlp.down_proj"}
    aqlm = {name for name, m in model.named_modules() if isinstance(m, AqlmLinear)}
    assert "model.language_model.layers.0.mlp.down_proj" not in aqlm  # VQC wins over AQLM
    assert "model.language_model.layers.0.mlp.up_proj" in aqlm and len(aqlm) == 13
    stages = {e["stage"] for e in model.config.quantization_config.quantization_map.values()}
    assert stages == {"vqc", "aqlm"}
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert swapped(again) == swapped(model)
    torch.testing.assert_close(vision_hidden(again), vision_hidden(model), rtol=0, atol=0)
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_calibrated_fit_uses_xtx(qwen3_dir):
    calibration = {"text_files": [str(shipped_text_path("calibration"))], "num_samples": 2, "seq_len": 16}
    config = RiverOneConfig(vqc={"target_modules": ["model.layers.1.mlp.down_proj"], "calibration": calibration,
                                 "baselines": False, **FAST_VQC})
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=config)
    report = model.config.quantization_config.quantization_map["model.layers.1.mlp.down_proj"]["report"]
    assert report["objective"] == "output (XᵀX)" and report["classical_error"] is None


@pytest.mark.parametrize("stage", ["aqlm", "vqc"])
def test_missing_tokenizer_names_the_stage(stage, tmp_path):
    tiny_qwen3().save_pretrained(tmp_path)  # no tokenizer beside the weights
    calibration = {"text_files": [str(shipped_text_path("calibration"))], "num_samples": 2, "seq_len": 16}
    fields = {"target_modules": QWEN_DOWN, "calibration": calibration}
    config = RiverOneConfig(**{stage: {**fields, **(FAST_VQC if stage == "vqc" else FAST_AQLM)}})
    with pytest.raises(ValueError, match=f"`{stage}.calibration.tokenizer`"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"n_wires": 9, "exact_noise": True}, "vqc.n_wires"),
        ({"baselines": "yes"}, "vqc.baselines"),
        ({"init_lr": 0}, "vqc.init_lr"),
        ({"noise_probability": True}, "vqc.noise_probability"),
        ({"calibration": {"text_files": []}}, "calibration"),
        ({"calibration": {"files": ["a.txt"]}}, "vqc.calibration"),
    ],
    ids=["exact-noise-wires", "baselines", "init-lr", "noise-bool", "calibration-empty", "calibration-unknown"],
)
def test_bad_spec_fields_name_them(fields, named):
    with pytest.raises(ValueError, match=f"`{named}"):
        RiverOneConfig(vqc={"target_modules": ["x"], **fields})


def meta_qwen3(**overrides):
    with torch.device("meta"):
        return tiny_qwen3(**overrides)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"target_modules": r"model\.layers\.\d+\.mlp\.nothing"}, "matches no Linear"),
        ({"target_modules": ["mlp.nothing"]}, "names no Linear"),
        ({"target_modules": QWEN_DOWN, "rank": 65}, "vqc.rank"),
        ({"target_modules": r"model\.layers\.0\..*"}, "already taken"),
    ],
    ids=["regex-matches-nothing", "name-matches-nothing", "rank-too-large", "all-claimed"],
)
def test_plan_errors_on_the_meta_skeleton(fields, message):
    claimed = {"model.layers.0"}  # e.g. a block an earlier stage owns
    with pytest.raises(ValueError, match=message):
        vqc_stage.VqcStage().plan(meta_qwen3(), VqcSpec(**fields), claimed)


def test_plan_skips_claimed_and_refuses_tied():
    plan = vqc_stage.VqcStage().plan(meta_qwen3(), VqcSpec(target_modules=QWEN_DOWN), {"model.layers.0.mlp.down_proj"})
    assert plan.claimed == {"model.layers.1.mlp.down_proj"}
    with pytest.raises(ValueError, match="tied"):
        vqc_stage.VqcStage().plan(meta_qwen3(tie_word_embeddings=True), VqcSpec(target_modules=["lm_head"]), set())


NO_PENNYLANE = """
import sys
sys.modules["pennylane"] = None  # as if it were not installed
import riverone_hf
from riverone_hf import RiverOneConfig
from transformers import AutoModelForCausalLM
# (no `quantization_config=None` for the checkpoint: transformers then skips its quantizer altogether)
for path, kwargs in ((sys.argv[1], {"quantization_config": RiverOneConfig(vqc={"target_modules": ["lm_head"]})}),
                     (sys.argv[2], {})):
    try:
        AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ImportError as err:
        print("IMPORT-ERROR:", err)
"""


def test_missing_pennylane_fails_with_the_pip_command(qwen3_dir, vqc_qwen3):
    """Both a VQC config on a dense checkpoint and a VQC checkpoint fail in validate_environment."""
    args = [sys.executable, "-c", NO_PENNYLANE, qwen3_dir, vqc_qwen3[1]]
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stdout.splitlines() if line.startswith("IMPORT-ERROR:")]
    assert len(errors) == 2, result.stdout + result.stderr[-2000:]
    assert all("pip install" in line for line in errors)
