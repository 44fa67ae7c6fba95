"""The `riverone` console script on a tiny model: quantize, export, clear errors, no partial output."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import riverone_hf  # noqa: F401
from riverone_hf import AqlmLinear
from riverone_hf.cli import main
from riverone_hf.fileio import atomic_output_dir
from riverone_hf.metrics.evaluation import QUANTIZATION_FILE, weight_hashes
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


def test_quantize_records_its_wall_time_and_evaluate_reports_it_for_those_weights(qwen3_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", qwen3_dir, str(out), "--config", write_config(tmp_path / "c.yaml")]) == 0
    record = json.loads((out / QUANTIZATION_FILE).read_text())
    assert record["wall_time_s"] > 0 and record["source"] == qwen3_dir
    assert record["weights_sha256"] == weight_hashes(str(out))
    text = tmp_path / "held_out.txt"
    text.write_text("It is a truth universally acknowledged, that a single man. " * 8)
    assert main(["evaluate", str(out), "--text", str(text), "--seq-len", "32", "--max-windows", "2"]) == 0
    results = json.loads((out / "riverone_results.json").read_text())
    assert results["wall_times_s"]["quantization"] == record["wall_time_s"]
    assert results["quantization"]["machine"] == record["machine"]
    # other weights (trained, re-saved) than those the record describes: no quantization time is reported
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(out)
    assert main(["evaluate", str(out), "--text", str(text), "--seq-len", "32", "--max-windows", "2"]) == 0
    results = json.loads((out / "riverone_results.json").read_text())
    assert "quantization" not in results["wall_times_s"] and "quantization" not in results


def test_missing_source_is_a_clear_error_before_work(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "no-such-model"), str(tmp_path / "q")]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("flag", [False, True])
def test_demo_block_finetune_flag_reaches_its_config(monkeypatch, flag):
    """`riverone demo --block-finetune` runs the demo with `aqlm.block_finetune.enabled`; without it, off."""
    from riverone_hf.cli import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: seen.update(
        enabled=demo.demo_config(kwargs["block_finetune"]).aqlm.block_finetune.enabled))
    main(["demo", *(["--block-finetune"] if flag else [])])
    assert seen == {"enabled": flag}
