"""`riverone evaluate` / `evaluate_checkpoint`: the shipped evaluate metric loads offline by local path and
agrees with `perplexity`; the results JSON records value, settings, data fingerprint, sizes, machine and
the weights' sha256; model cards are rendered from it (and only from it)."""

from __future__ import annotations

import hashlib
import json
import os

import evaluate
import pytest
import yaml
from transformers import AutoModelForCausalLM

import riverone_hf  # noqa: F401
from riverone_hf import RiverOneConfig
from riverone_hf.cli import main
from riverone_hf.hub import render_card
from riverone_hf.metrics.evaluate_modules import metric_path
from riverone_hf.metrics.evaluation import RESULTS_FILE, evaluate_checkpoint, weight_hashes
from riverone_hf.metrics.perplexity import perplexity
from tests.tiny_models import FAST_AQLM, char_tokenizer, tiny_qwen3

TEXT = "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement. " * 4


@pytest.fixture(scope="module")
def aqlm_dir(qwen3_dir, tmp_path_factory):
    config = RiverOneConfig(aqlm={"num_codebooks": 1, "nbits_per_codebook": 8, "in_group_size": 8, **FAST_AQLM})
    model = AutoModelForCausalLM.from_pretrained(qwen3_dir, quantization_config=config)
    out = tmp_path_factory.mktemp("eval") / "aqlm"
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return str(out)


def test_metric_module_loads_offline_and_matches_perplexity(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    model, tokenizer = tiny_qwen3(), char_tokenizer()
    metric = evaluate.load(metric_path("riverone_perplexity"))
    out = metric.compute(predictions=[TEXT], model=model, tokenizer=tokenizer, seq_len=32, max_windows=3)
    assert out["perplexity"] == perplexity(model, tokenizer, TEXT, seq_len=32, max_windows=3, show_progress=False)
    assert out["num_tokens"] == len(TEXT) and out["num_windows"] == 3 and out["num_predicted_tokens"] == 3 * 31
    with pytest.raises(ValueError, match="no shipped evaluate metric named 'nope'.*riverone_perplexity"):
        metric_path("nope")


def test_cli_evaluate_writes_measured_results(aqlm_dir, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    assert main(["evaluate", aqlm_dir, "--text", str(text), "--seq-len", "32", "--max-windows", "3"]) == 0
    assert "perplexity:" in capsys.readouterr().out
    results = json.loads(open(os.path.join(aqlm_dir, RESULTS_FILE)).read())
    [e] = results["evaluations"]
    assert e["dataset"] == {"name": "held_out.txt", "sha256": hashlib.sha256(TEXT.encode()).hexdigest(),
                            "num_characters": len(TEXT), "num_tokens": len(TEXT)}
    assert e["settings"] == {"seq_len": 32, "max_windows": 3, "batch_size": 1, "num_windows": 3,
                             "num_predicted_tokens": 93}
    again = AutoModelForCausalLM.from_pretrained(aqlm_dir)
    assert e["value"] == perplexity(again, char_tokenizer(), TEXT, seq_len=32, max_windows=3, show_progress=False)
    assert results["command"].startswith(f"riverone evaluate {aqlm_dir} --text {text} --seq-len 32")
    assert results["model"]["weights_sha256"] == weight_hashes(aqlm_dir) and results["model"]["stages"] == ["aqlm"]
    sizes = results["sizes"]
    assert sizes["total_bytes"] == sum(sizes["parts_bytes"].values())
    stored = sum(sizes["parts_bytes"][f"aqlm {k}"] for k in ("codes", "codebooks", "scales")) * 8
    assert sizes["quantized_bits_per_weight"] == stored / sizes["quantized_weights"]  # codebooks included (tiny: ~14)
    assert {"platform", "cpu_count", "torch", "transformers"} <= set(results["machine"])
    assert set(results["wall_times_s"]) == {"load", "perplexity"}


def test_card_shows_only_measured_figures(aqlm_dir, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    results = evaluate_checkpoint(aqlm_dir, str(text), seq_len=32, max_windows=2)
    card = str(render_card(aqlm_dir, "org/tiny-1x8"))
    header = yaml.safe_load(card.split("---")[1])
    assert header["model-index"][0]["results"][0]["metrics"][0]["value"] == results["evaluations"][0]["value"]
    assert "base_model" not in header and "license" not in header  # not known: not stated
    assert header["tags"] == ["riverone", "aqlm", "quantized"] and header["pipeline_tag"] == "text-generation"
    assert "14 module(s) with in_group_size=8, nbits_per_codebook=8, num_codebooks=1, out_group_size=1" in card
    assert "--format aqlm" in card  # AQLM only, one scheme: the stock-transformers route is stated

    # without evaluations the evaluation section is left out, and so is the model-index
    stripped = dict(results, evaluations=[])
    with open(os.path.join(aqlm_dir, RESULTS_FILE), "w") as handle:
        json.dump(stripped, handle)
    card = str(render_card(aqlm_dir, "org/tiny-1x8"))
    assert "## Evaluation" not in card and "model-index" not in card and "## Sizes" in card


def test_evaluate_refuses_missing_inputs(aqlm_dir, tmp_path, capsys):
    assert main(["evaluate", aqlm_dir, "--text", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["evaluate", aqlm_dir, "--text", str(short), "--seq-len", "64"]) == 2
    assert "fewer than seq_len=64" in capsys.readouterr().err
