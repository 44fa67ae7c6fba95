"""Perplexity of a causal LM on a text, and seeded token windows for calibration.

Both functions tokenise the text ONCE, as one stream, without special tokens
(``add_special_tokens=False``): windows are cut from the token stream, so they start and end
mid-sentence. Both are deterministic: `perplexity` walks the windows in order, `token_windows` draws
them with a seeded ``torch.Generator`` on the CPU.

Perplexity definition used here (state it with every figure): the text's token stream is cut into
``floor(num_tokens / seq_len)`` non-overlapping windows of exactly ``seq_len`` tokens (the tail
shorter than ``seq_len`` is dropped); within each window every token but the first is predicted
from the tokens before it in that window, so each window contributes ``seq_len - 1`` predictions
and no context crosses a window boundary. Perplexity = ``exp(mean negative log-likelihood, in
nats, over all predicted tokens)``, with log-probabilities computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["perplexity", "token_windows", "tokenize_text"]


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D ``LongTensor``, without special tokens and without truncation."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a model without parameters: run on the CPU
        return torch.device("cpu")


def perplexity(
    model,
    tokenizer,
    text: str,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 1,
    show_progress: bool = True,
) -> float:
    """Perplexity of causal LM ``model`` on ``text``, over non-overlapping ``seq_len``-token windows.

    Args:
        model: a causal LM whose forward takes ``input_ids`` and returns ``.logits`` of shape
            ``[batch, seq_len, vocab]`` (any transformers ``*ForCausalLM``).
        tokenizer: the model's tokenizer; ``text`` is tokenised once, without special tokens.
        seq_len: tokens per window (>= 2); each window gives ``seq_len - 1`` predictions.
        max_windows: evaluate only the FIRST ``max_windows`` windows (``None``: all of them).
        batch_size: windows per forward pass; does not change the result beyond float rounding.
        show_progress: show a tqdm bar over the batches.

    Returns:
        ``exp(mean NLL in nats over all predicted tokens)`` as a Python float. See the module
        docstring for the exact definition.

    Raises ``ValueError`` when the text has fewer than ``seq_len`` tokens or an argument is out of
    range. The model is run in eval mode under ``torch.no_grad()`` and its training flag is restored.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a window of seq_len tokens predicts seq_len - 1), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")

    ids = tokenize_text(tokenizer, text)
    num_windows = ids.numel() // seq_len
    if num_windows == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than seq_len={seq_len}: no full window to evaluate")
    if max_windows is not None:
        num_windows = min(num_windows, max_windows)
    windows = ids[: num_windows * seq_len].view(num_windows, seq_len)

    device = _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0  # accumulated in float64 on the host: deterministic and free of float32 drift
    total_predicted = 0
    try:
        with torch.no_grad():
            starts = range(0, num_windows, batch_size)
            for start in tqdm(starts, desc=f"perplexity (seq_len {seq_len})", unit="batch", disable=not show_progress):
                batch = windows[start : start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                shift_logits = logits[:, :-1, :].float()
                targets = batch[:, 1:]
                nll = F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.size(-1)), targets.reshape(-1), reduction="sum"
                )
                total_nll += float(nll.double().item())
                total_predicted += targets.numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_predicted)


def token_windows(
    tokenizer,
    texts: str | Sequence[str],
    num_samples: int,
    seq_len: int,
    seed: int,
) -> torch.Tensor:
    """``num_samples`` random windows of ``seq_len`` tokens: a ``LongTensor[num_samples, seq_len]``.

    Each text is tokenised once without special tokens and the token streams are concatenated (in
    the given order) into one stream; window starts are drawn uniformly from
    ``[0, num_tokens - seq_len]`` with a ``torch.Generator`` seeded with ``seed`` (on the CPU, so
    the same seed gives the same windows on every machine). Windows may overlap. Meant for
    calibration data: ``token_windows(tok, read_shipped_text("calibration"), 128, 512, seed=0)``.

    Raises ``ValueError`` when the concatenated text has fewer than ``seq_len`` tokens (naming both
    numbers), or when ``num_samples`` or ``seq_len`` is below 1.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("texts is empty: give at least one text")
    stream = torch.cat([tokenize_text(tokenizer, text) for text in texts])
    num_tokens = stream.numel()
    if num_tokens < seq_len:
        raise ValueError(
            f"the text has {num_tokens} tokens, fewer than seq_len={seq_len}: cannot cut a window of seq_len tokens"
        )
    generator = torch.Generator(device="cpu").manual_seed(seed)
    starts = torch.randint(0, num_tokens - seq_len + 1, (num_samples,), generator=generator)
    offsets = torch.arange(seq_len)
    return stream[starts[:, None] + offsets[None, :]]
