"""Image-text agreement of a vision-language model: does the model find the right text for an image?

For every example (an image, a prompt and candidate answers, one of them right) the model scores each
candidate by its mean log-probability per token given the image and the prompt (length-normalised, so
longer candidates are not penalised for their length); the example counts as agreeing when the right
candidate scores highest. Agreement = fraction of agreeing examples. This is a generation-free accuracy:
for "Which digit is this?" with candidates "0".."9" it equals greedy answer accuracy restricted to those
answers; for captions, the candidates are the image's caption and captions of other images.

Inputs are token ids the caller built with the model's processor/chat template (the image tokens already
expanded in ``prefix_ids``): the metric does not guess a prompt format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .perplexity import _model_device

__all__ = ["ImageTextExample", "candidate_scores", "image_text_agreement"]


@dataclass
class ImageTextExample:
    """One image with its prompt and candidate answers.

    Args:
        prefix_ids: token ids of the prompt, image tokens included (1-D).
        pixel_values: the processor's pixel values of the image: [channels, height, width], or
            [tiles, channels, height, width] for an image cut into tiles (the prompt holds the tokens of all).
        candidates: token ids of each candidate answer (each non-empty).
        label: index of the right candidate.
    """

    prefix_ids: Sequence[int]
    pixel_values: torch.Tensor
    candidates: Sequence[Sequence[int]]
    label: int

    def __post_init__(self):
        if len(self.prefix_ids) < 1:
            raise ValueError("`prefix_ids` must hold at least one token (the prompt, image tokens included)")
        if len(self.candidates) < 2 or any(len(c) < 1 for c in self.candidates):
            raise ValueError(f"`candidates` must be >= 2 non-empty token lists, got {len(self.candidates)} "
                             "(a single candidate always agrees)")
        if not 0 <= self.label < len(self.candidates):
            raise ValueError(f"`label` must index `candidates` (0..{len(self.candidates) - 1}), got {self.label}")


@torch.no_grad()
def candidate_scores(model, example: ImageTextExample, pad_token_id: int = 0) -> torch.Tensor:
    """Mean log-probability per token (nats) of each candidate of `example`, in one batched forward
    (right-padded; the padding is masked out and never scored). Returns a float32 tensor [num_candidates]."""
    device = _model_device(model)
    prefix = list(example.prefix_ids)
    rows = [prefix + list(c) for c in example.candidates]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    image = example.pixel_values if example.pixel_values.dim() == 4 else example.pixel_values.unsqueeze(0)
    pixels = image.repeat(len(rows), 1, 1, 1)  # every row's tiles, in row order
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   pixel_values=pixels.to(device, dtype)).logits.float()
    log_probs = F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
    scores = []
    for i, candidate in enumerate(example.candidates):
        # logits at position t predict token t+1: the candidate's tokens are predicted from len(prefix)-1 on
        start = len(prefix) - 1
        scores.append(log_probs[i, start : start + len(candidate)].mean())
    return torch.stack(scores).cpu()


def image_text_agreement(model, examples: Sequence[ImageTextExample], pad_token_id: int = 0) -> dict:
    """Agreement of `model` on `examples` (see the module docstring): the fraction whose right candidate
    scores highest, the count, and the mean score of the right candidates (nats per token)."""
    if not examples:
        raise ValueError("`examples` is empty: nothing to measure")
    was_training = model.training
    model.eval()
    try:
        agree, right = 0, 0.0
        for example in examples:
            scores = candidate_scores(model, example, pad_token_id)
            agree += int(int(scores.argmax()) == example.label)
            right += float(scores[example.label])
    finally:
        model.train(was_training)
    return {"agreement": agree / len(examples), "num_examples": len(examples),
            "mean_right_log_prob_per_token": right / len(examples)}
