"""Image-text agreement: candidate scores equal unpadded per-candidate log-probabilities, the image matters,
agreement counts the examples whose right candidate scores highest, the evaluate module agrees offline."""

from __future__ import annotations

import evaluate
import pytest
import torch
import torch.nn.functional as F

from riverone_hf.metrics.evaluate_modules import metric_path
from riverone_hf.metrics.image_text import ImageTextExample, candidate_scores, image_text_agreement
from tests.tiny_models import tiny_internvl

IMAGE_TOKEN = 5


@pytest.fixture(scope="module")
def vlm():
    return tiny_internvl()


def examples(model, n=4, seed=0, labels=None):
    config = model.config
    image_tokens = int((config.vision_config.image_size[0] // config.vision_config.patch_size[0]) ** 2
                       * config.downsample_ratio**2)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prefix = [IMAGE_TOKEN] * image_tokens + torch.randint(10, 97, (5,), generator=g).tolist()
        candidates = [torch.randint(10, 97, (length,), generator=g).tolist() for length in (1, 3, 2)]
        out.append(ImageTextExample(prefix, torch.randn(3, 28, 28, generator=g), candidates,
                                    0 if labels is None else labels[i]))
    return out


def unpadded_score(model, example, candidate):
    ids = torch.tensor([list(example.prefix_ids) + list(candidate)])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=example.pixel_values[None]).logits.float()
    log_probs = F.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return log_probs[len(example.prefix_ids) - 1:].mean()


def test_scores_equal_unpadded_log_probs_and_depend_on_the_image(vlm):
    example = examples(vlm, n=1)[0]
    scores = candidate_scores(vlm, example)
    expected = torch.stack([unpadded_score(vlm, example, c) for c in example.candidates])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    other = ImageTextExample(example.prefix_ids, torch.randn(3, 28, 28), example.candidates, 0)
    assert not torch.allclose(candidate_scores(vlm, other), scores)


def test_agreement_counts_right_candidates_scoring_highest(vlm):
    probe = examples(vlm)
    best = [int(candidate_scores(vlm, e).argmax()) for e in probe]
    worst = [int(candidate_scores(vlm, e).argmin()) for e in probe]
    assert image_text_agreement(vlm, examples(vlm, labels=best))["agreement"] == 1.0
    assert image_text_agreement(vlm, examples(vlm, labels=worst))["agreement"] == 0.0
    mixed = best[:2] + worst[2:]
    result = image_text_agreement(vlm, examples(vlm, labels=mixed))
    assert result["agreement"] == 0.5 and result["num_examples"] == 4


def test_evaluate_module_offline_matches_library(vlm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    data = examples(vlm, labels=[0, 1, 2, 0])
    metric = evaluate.load(metric_path("riverone_image_text_agreement"))
    out = metric.compute(references=[e.label for e in data], model=vlm, examples=data)
    assert out == image_text_agreement(vlm, data)
    with pytest.raises(ValueError, match="references"):
        metric.compute(references=[1, 1, 1, 1], model=vlm, examples=data)


@pytest.mark.parametrize("fields, name", [
    ({"candidates": [[1]]}, "candidates"), ({"candidates": [[1], []]}, "candidates"),
    ({"label": 2}, "label"), ({"prefix_ids": []}, "prefix_ids"),
])
def test_bad_examples_are_named(fields, name):
    base = {"prefix_ids": [1, 2], "pixel_values": torch.zeros(3, 28, 28), "candidates": [[1], [2]], "label": 0}
    with pytest.raises(ValueError, match=name):
        ImageTextExample(**{**base, **fields})
