"""A riverone load is all-or-nothing: damaged, incomplete, edited or pickle checkpoints raise, a load
without the plugin raises, and `riverone verify` checks the recorded hashes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from riverone_hf import integrity
from riverone_hf.cli.main import main
from tests.tiny_models import input_ids

WEIGHTS = "model.safetensors"


def _tensors(path):
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def test_reload_is_identical_and_the_guard_is_gone(riverone_ckpt):
    path, logits = riverone_ckpt
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(model(input_ids()).logits, logits)
    metadata = integrity.file_metadata(os.path.join(path, WEIGHTS))
    guard = metadata[integrity.GUARD_MODULE_KEY]
    assert not hasattr(model.get_submodule(guard), "weight")  # the guard buffer is removed after loading
    assert set(json.loads(metadata[integrity.MANIFEST_KEY])) == integrity.verify_checkpoint(path)["keys"]


def test_load_without_the_plugin_fails(riverone_ckpt):
    """A fresh interpreter that never imports riverone_hf: the guard's size mismatch stops the load."""
    code = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({riverone_ckpt[0]!r})
        except RuntimeError as err:
            assert "riverone_hf" not in sys.modules
            print("REFUSED", err)
            sys.exit(0)
        print("LOADED")
        sys.exit(1)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "REFUSED" in result.stdout
    assert "MISMATCH" in result.stdout + result.stderr  # transformers' load report names the guard tensor


def test_bit_flip_in_tensor_data_is_refused(ckpt_copy):
    path = ckpt_copy / WEIGHTS
    _, start = integrity.read_header(str(path))
    data = bytearray(path.read_bytes())
    data[start + (len(data) - start) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(integrity.IntegrityError, match="differ from the hashes"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)
    assert main(["verify", str(ckpt_copy)]) == 2


def test_truncated_file_is_refused(ckpt_copy):
    path = ckpt_copy / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


@pytest.mark.parametrize("suffix", ["codebooks", "scales", "codes"])
def test_missing_tensor_is_refused(ckpt_copy, suffix):
    tensors, metadata = _tensors(ckpt_copy / WEIGHTS)
    name = next(k for k in tensors if k.endswith("." + suffix))
    del tensors[name]
    save_file(tensors, str(ckpt_copy / WEIGHTS), metadata=metadata)  # hashes still list it
    with pytest.raises(integrity.IntegrityError, match="missing from the files"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)
    metadata.pop(integrity.MANIFEST_KEY)  # and without hashes (an older checkpoint): the structure check
    save_file(tensors, str(ckpt_copy / WEIGHTS), metadata=metadata)
    with pytest.raises(ValueError, match="incomplete.*" + name.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def _edit_map(ckpt, edit):
    config_path = ckpt / "config.json"
    config = json.loads(config_path.read_text())
    edit(config["quantization_config"])
    config_path.write_text(json.dumps(config))


def test_removed_map_entry_is_refused(ckpt_copy):
    _edit_map(ckpt_copy, lambda q: q["quantization_map"].pop("model.layers.0.mlp.down_proj"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_removed_map_is_refused(ckpt_copy):
    _edit_map(ckpt_copy, lambda q: q.pop("quantization_map"))
    with pytest.raises(ValueError, match="incomplete"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda e: e.pop("num_codebooks"), r"model\.layers\.0\.mlp\.up_proj.*num_codebooks"),
    (lambda e: e.update(num_codebooks="2"), r"model\.layers\.0\.mlp\.up_proj.*num_codebooks"),
    (lambda e: e.update(nbits_per_codebook=2**70), r"model\.layers\.0\.mlp\.up_proj.*nbits_per_codebook"),
    (lambda e: e.pop("stage"), r"model\.layers\.0\.mlp\.up_proj.*stage"),
])
def test_malformed_map_entry_names_module_and_field(ckpt_copy, edit, message):
    _edit_map(ckpt_copy, lambda q: edit(q["quantization_map"]["model.layers.0.mlp.up_proj"]))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_map_naming_a_missing_module_is_refused(ckpt_copy):
    _edit_map(ckpt_copy, lambda q: q["quantization_map"].update(
        {"model.layers.9.mlp.up_proj": q["quantization_map"]["model.layers.0.mlp.up_proj"]}))
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_pickle_weights_are_refused(ckpt_copy):
    tensors, _ = _tensors(ckpt_copy / WEIGHTS)
    torch.save(tensors, ckpt_copy / "pytorch_model.bin")
    os.remove(ckpt_copy / WEIGHTS)
    with pytest.raises(ValueError, match="safetensors only"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)
    assert main(["verify", str(ckpt_copy)]) == 2


def test_verify_opt_out_skips_hashing(ckpt_copy, monkeypatch, riverone_ckpt):
    path = ckpt_copy / WEIGHTS
    header, start = integrity.read_header(str(path))
    data = bytearray(path.read_bytes())
    data[start + header["lm_head.weight"]["data_offsets"][0]] ^= 0x01  # a mantissa bit of one lm_head weight
    path.write_bytes(bytes(data))
    monkeypatch.setenv("RIVERONE_VERIFY", "0")
    AutoModelForCausalLM.from_pretrained(ckpt_copy)  # loads: the user opted out
    monkeypatch.setenv("RIVERONE_VERIFY", "1")
    with pytest.raises(integrity.IntegrityError):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_corrupt_guard_is_refused(ckpt_copy):
    path = ckpt_copy / WEIGHTS
    header, start = integrity.read_header(str(path))
    guard = integrity.file_metadata(str(path))[integrity.GUARD_MODULE_KEY] + ".weight"
    data = bytearray(path.read_bytes())
    data[start + header[guard]["data_offsets"][0]] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(integrity.IntegrityError, match="guard"):
        _load_unverified(ckpt_copy)  # hashing off: the guard's own check still catches it


def _load_unverified(path):
    os.environ["RIVERONE_VERIFY"] = "0"
    try:
        return AutoModelForCausalLM.from_pretrained(path)
    finally:
        os.environ.pop("RIVERONE_VERIFY")


def test_verify_command(riverone_ckpt, capsys):
    assert main(["verify", riverone_ckpt[0]]) == 0
    assert "OK" in capsys.readouterr().out
