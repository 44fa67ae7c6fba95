"""The `riverone` console script on a tiny model: quantize, export, clear errors, no partial output."""

import os

import pytest
from transformers import AutoModelForCausalLM

import riverone_hf  # noqa: F401
from riverone_hf import AqlmLinear
from riverone_hf.cli import main
from riverone_hf.fileio import atomic_output_dir
from tests.tiny_models import FAST_AQLM


def write_config(path, **fields):
    fields = {**FAST_AQLM, **fields}
    path.write_text("aqlm:\n" + "".join(f"  {k}: {v}\n" for k, v in fields.items()))
    return str(path)


def test_quantize_then_export(qwen3_dir, tmp_path, capsys):
    config = write_config(tmp_path / "cfg.yaml", num_codebooks=1, nbits_per_codebook=8)
    assert main(["quantize", qwen3_dir, str(tmp_path / "q"), "--config", config]) == 0
    report = capsys.readouterr().out
    assert "bits/weight" in report and "MiB" in report
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(model.model.layers[0].mlp.up_proj, AqlmLinear)
    assert os.path.isfile(tmp_path / "q" / "tokenizer.json")
    assert main(["export", str(tmp_path / "q"), str(tmp_path / "stock"), "--format", "aqlm"]) == 0
    assert os.path.isfile(tmp_path / "stock" / "model.safetensors")


def test_existing_output_is_refused_before_work(qwen3_dir, tmp_path, capsys):
    (tmp_path / "q").mkdir()
    assert main(["quantize", qwen3_dir, str(tmp_path / "q")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_config_value_is_named(qwen3_dir, tmp_path, capsys):
    config = write_config(tmp_path / "cfg.yaml", nbits_per_codebook=20)
    assert main(["quantize", qwen3_dir, str(tmp_path / "q"), "--config", config]) == 2
    assert "nbits_per_codebook" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_bad_dtype_is_named(qwen3_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["quantize", qwen3_dir, str(tmp_path / "q"), "--dtype", "float8"])


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(str(target)) as tmp:
            with open(os.path.join(tmp, "model.safetensors"), "wb") as handle:
                handle.write(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_failure_inside_quantization_leaves_no_output(qwen3_dir, tmp_path, monkeypatch, capsys):
    def explode(*args, **kwargs):
        raise ValueError("engine failed")

    monkeypatch.setattr("riverone_hf.stages.aqlm.quantize_weight", explode)
    assert main(["quantize", qwen3_dir, str(tmp_path / "q"), "--config", write_config(tmp_path / "c.yaml")]) == 2
    assert "engine failed" in capsys.readouterr().err
    assert [p for p in os.listdir(tmp_path) if p != "c.yaml"] == []
