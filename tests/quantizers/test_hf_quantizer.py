"""from_pretrained with RiverOneConfig on tiny Qwen3 / InternVL: scope, reload, dtype, calibration, export."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import riverone_hf  # noqa: F401  (registers quant_method "riverone")
from riverone_hf import AqlmLinear, RiverOneConfig
from riverone_hf.export.aqlm import export_aqlm
from tests.tiny_models import FAST_AQLM, input_ids, save_dense, tiny_internvl, tiny_qwen3

SCHEME = {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8}


def aqlm_config(**fields) -> RiverOneConfig:
    return RiverOneConfig(aqlm={**SCHEME, **FAST_AQLM, **fields})


def converted(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, AqlmLinear)}


def linears(model, prefix="") -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(prefix)}


@pytest.fixture(scope="module")
def quantized_qwen3(qwen3_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=aqlm_config())
    out = tmp_path_factory.mktemp("qwen3") / "quantized"
    model.save_pretrained(out)
    return model, str(out)


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=input_ids() if ids is None else ids).logits


def test_qwen3_converts_decoder_linears_only(quantized_qwen3):
    model, _ = quantized_qwen3
    dense = tiny_qwen3()
    assert converted(model) == linears(dense, "model.layers.")
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert set(model.config.quantization_config.quantization_map) == converted(model)


def test_quantized_logits_close_to_dense(quantized_qwen3):
    model, _ = quantized_qwen3
    dense = tiny_qwen3()
    reference = logits(dense)
    error = (logits(model) - reference).norm() / reference.norm()
    assert error < 0.5, f"relative logit error {error:.3f}"


RELOAD_SCRIPT = """
import sys, torch, riverone_hf
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert type(model.model.layers[0].mlp.up_proj).__name__ == "AqlmLinear"
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
"""


def run_python(script, *args, env=None):
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_save_reload_in_fresh_process_identical_logits(quantized_qwen3, tmp_path):
    model, out = quantized_qwen3
    ids = input_ids()
    torch.save(ids, tmp_path / "ids.pt")
    run_python(RELOAD_SCRIPT, out, tmp_path / "ids.pt", tmp_path / "logits.pt")
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits(model, ids))


def test_checkpoint_is_safetensors_in_aqlm_layout(quantized_qwen3):
    _, out = quantized_qwen3
    assert sorted(f for f in os.listdir(out) if f.endswith((".bin", ".pt", ".safetensors"))) == ["model.safetensors"]
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.codes").get_dtype() == "I8"
        assert f.get_slice("model.layers.0.mlp.up_proj.codes").get_shape() == [128, 8, 2]
        assert f.get_slice("model.layers.0.mlp.up_proj.codebooks").get_shape() == [2, 256, 1, 8]
        assert f.get_slice("model.layers.0.mlp.up_proj.scales").get_shape() == [128, 1, 1, 1]
        assert "model.layers.0.mlp.up_proj.weight" not in f.keys()


def test_dtype_is_honoured(qwen3_dir):
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=aqlm_config(), dtype=torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.codebooks.dtype == torch.bfloat16 and layer.scales.dtype == torch.bfloat16
    assert logits(model).dtype == torch.bfloat16


def test_overrides_give_mixed_precision_and_skips(qwen3_dir, tmp_path):
    config = aqlm_config(overrides=[
        {"pattern": r".*\.down_proj", "num_codebooks": 1, "nbits_per_codebook": 8},
        {"pattern": r"model\.layers\.1\.self_attn\..*", "skip": True},
    ])
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=config)
    assert model.model.layers[0].mlp.down_proj.num_codebooks == 1
    assert model.model.layers[0].mlp.up_proj.num_codebooks == 2
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)
    model.save_pretrained(tmp_path / "mixed")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed")
    assert torch.equal(logits(again), logits(model))


def test_bad_target_fails_before_loading_weights(qwen3_dir):
    with pytest.raises(ValueError, match="matches no Linear"):
        AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=aqlm_config(target_modules=r"nothing\.here"))
    with pytest.raises(ValueError, match="in_group_size"):
        AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=aqlm_config(in_group_size=48))


def test_dequantize_gives_linears_with_same_outputs(qwen3_dir):
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=aqlm_config())
    before = logits(model)
    weight = model.model.layers[0].mlp.up_proj.dequantize().detach().clone()
    model.dequantize()
    assert not converted(model)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, weight)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def test_calibrated_from_text_file(qwen3_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20)
    config = aqlm_config(calibration={"text_files": [str(text)], "num_samples": 4, "seq_len": 32})
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=config)
    assert converted(model) == linears(tiny_qwen3(), "model.layers.")
    again = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=config)
    assert torch.equal(logits(again), logits(model)), "same seed must give the same codes"


def test_missing_calibration_file_fails_fast(qwen3_dir):
    config = aqlm_config(calibration={"text_files": ["/nonexistent/file.txt"]})
    with pytest.raises(ValueError, match="do not exist"):
        AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=config)


def test_internvl_quantizes_language_model_only(tmp_path):
    dense = tiny_internvl()
    path = save_dense(dense, tmp_path / "internvl")
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=aqlm_config())
    assert converted(model) == linears(dense, "model.language_model.layers.")
    for kept in ("model.vision_tower.encoder.layer.0.attention.q_proj", "model.multi_modal_projector.linear_1", "lm_head"):
        assert isinstance(model.get_submodule(kept), nn.Linear)
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(again), logits(model))


def test_internvl_calibrated_on_text(tmp_path):
    path = save_dense(tiny_internvl(), tmp_path / "internvl")
    text = tmp_path / "calib.txt"
    text.write_text("Persuasion is a novel by Jane Austen, published in 1817 after her death. " * 20)
    config = aqlm_config(calibration={"text_files": [str(text)], "num_samples": 2, "seq_len": 32})
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=config)
    assert len(converted(model)) == 14


def test_internvl_vision_tower_when_asked(tmp_path):
    path = save_dense(tiny_internvl(), tmp_path / "internvl")
    config = aqlm_config(target_modules=r"model\.vision_tower\..*\.mlp\.fc\d")
    model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=config)
    assert converted(model) == {f"model.vision_tower.encoder.layer.{i}.mlp.fc{j}" for i in range(2) for j in (1, 2)}


STOCK_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert "riverone_hf" not in sys.modules
assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"
assert type(model.lm_head).__name__ == "Linear"
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
"""


@pytest.mark.aqlm
def test_export_loads_in_stock_transformers_with_same_logits(quantized_qwen3, tmp_path):
    model, out = quantized_qwen3
    exported = tmp_path / "stock"
    export_aqlm(out, str(exported))
    quant = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "aqlm" and "lm_head" in quant["linear_weights_not_to_quantize"]
    assert "lm_head.weight" in quant["linear_weights_not_to_quantize"]
    ids = input_ids()
    torch.save(ids, tmp_path / "ids.pt")
    # NUMBA_NUM_THREADS=1: the aqlm package's CPU kernel races with more threads (see DESIGN.md).
    run_python(STOCK_SCRIPT, exported, tmp_path / "ids.pt", tmp_path / "logits.pt", env={"NUMBA_NUM_THREADS": "1"})
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_export_refuses_mixed_schemes(qwen3_dir, tmp_path):
    config = aqlm_config(overrides=[{"pattern": r".*\.down_proj", "num_codebooks": 1}])
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=config)
    model.save_pretrained(tmp_path / "mixed")
    with pytest.raises(ValueError, match="one scheme"):
        export_aqlm(str(tmp_path / "mixed"), str(tmp_path / "stock"))
    assert not (tmp_path / "stock").exists()
