"""`riverone import --format aqlm`: a checkpoint of transformers' AQLM integration becomes a riverone checkpoint
with the same tensors and logits (export -> import round trip), hashed and guarded; bad sources are named."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import riverone_hf  # noqa: F401
from riverone_hf import AqlmLinear, RiverOneConfig
from riverone_hf.cli import main
from riverone_hf.export.aqlm import export_aqlm, import_aqlm
from riverone_hf.integrity import GUARD_MODULE_KEY, file_metadata, verify_checkpoint
from tests.tiny_models import FAST_AQLM, PV_SCHEME, input_ids


@pytest.fixture(scope="module")
def stock(qwen3_dir, tmp_path_factory):
    """A riverone 2x8 tiny Qwen3 and its export to the stock AQLM format."""
    root = tmp_path_factory.mktemp("import")
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=RiverOneConfig(
        aqlm={**PV_SCHEME, **FAST_AQLM}))
    model.save_pretrained(root / "riverone")
    export_aqlm(str(root / "riverone"), str(root / "stock"))
    return model, root


def test_round_trip_gives_the_same_tensors_and_logits(stock, tmp_path):
    model, root = stock
    assert main(["import", str(root / "stock"), str(tmp_path / "back"), "--format", "aqlm"]) == 0
    verify_checkpoint(str(tmp_path / "back"))  # riverone hashes recorded and matching
    assert GUARD_MODULE_KEY in file_metadata(str(tmp_path / "back" / "model.safetensors"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert back.config.quantization_config.quantization_map == model.config.quantization_config.quantization_map
    originals = {n: m for n, m in model.named_modules() if isinstance(m, AqlmLinear)}
    imported = {n: m for n, m in back.named_modules() if isinstance(m, AqlmLinear)}
    assert set(imported) == set(originals)
    for name, module in imported.items():
        assert torch.equal(module.codes, originals[name].codes) and torch.equal(module.codebooks,
                                                                               originals[name].codebooks)
    with torch.no_grad():
        assert torch.equal(back(input_ids=input_ids()).logits, model(input_ids=input_ids()).logits)


def test_refuses_a_non_aqlm_source_and_writes_nothing(stock, tmp_path):
    _, root = stock
    with pytest.raises(ValueError, match="quant_method is 'riverone'"):
        import_aqlm(str(root / "riverone"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_skip_list_contradicting_the_stored_codes_is_named(stock, tmp_path):
    _, root = stock
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((root / "stock" / "config.json").read_text())
    config["quantization_config"]["linear_weights_not_to_quantize"].append("model.layers.0.mlp.up_proj")
    (bad / "config.json").write_text(json.dumps(config))
    save_file(load_file(root / "stock" / "model.safetensors"), bad / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.*stored codes"):
        import_aqlm(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_source_is_named_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        import_aqlm(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no config.json"):
        export_aqlm(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
