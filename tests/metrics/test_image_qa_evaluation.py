"""Image-text agreement in `riverone evaluate` / `evaluate_checkpoint` for a vision-language checkpoint: the prompts
of `ImageQATask` (chat template, image tokens expanded per tile), the entry in riverone_results.json (value, data
fingerprint, candidates), the card, and the errors raised before the model loads."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

import riverone_hf  # noqa: F401
from riverone_hf.cli import main
from riverone_hf.hub import render_card
from riverone_hf.metrics.evaluation import RESULTS_FILE, evaluate_checkpoint
from riverone_hf.metrics.image_qa import ImageQAExamples, ImageQATask, load_image_qa_examples
from riverone_hf.metrics.image_text import ImageTextExample, candidate_scores
from tests.tiny_models import save_image_answer_dataset, save_tiny_chat_internvl

QUESTION = "Which digit?"


@pytest.fixture(scope="module")
def vlm_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_qa")
    return save_tiny_chat_internvl(root / "vlm"), save_image_answer_dataset(root / "data", train=2, test=6)


def test_prompt_expands_the_image_once_per_tile_inside_the_chat_template(vlm_and_data):
    vlm, _ = vlm_and_data
    task = ImageQATask.from_pretrained(vlm, QUESTION)
    tokens = task.tokenizer
    for tiles in (1, 3):
        ids = task.prompt_ids(QUESTION, tiles)
        context = [i for i, t in enumerate(ids) if t == tokens.convert_tokens_to_ids(tokens.context_image_token)]
        assert len(context) == task.image_seq_length * tiles
        assert ids[context[0] - 1] == tokens.convert_tokens_to_ids(tokens.start_image_token)
        assert ids[context[-1] + 1] == tokens.convert_tokens_to_ids(tokens.end_image_token)
        assert context == list(range(context[0], context[0] + len(context)))  # one run of context tokens
    # the answer tokens are what the tiny template ("a:{answer}<end>") puts after the generation prompt "a:"
    assert task.answer_ids("7") == tokens("7<end>", add_special_tokens=False)["input_ids"]


def test_evaluate_records_the_agreement_of_those_weights(vlm_and_data, tmp_path, capsys):
    vlm, data = vlm_and_data
    text = tmp_path / "held_out.txt"
    text.write_text("Anne Elliot walked to Uppercross with her sisters. " * 8)
    assert main(["evaluate", vlm, "--text", str(text), "--seq-len", "32", "--max-windows", "2",
                 "--image-text", data, "--question", QUESTION]) == 0
    assert "image_text_agreement:" in capsys.readouterr().out
    results = json.loads(open(os.path.join(vlm, RESULTS_FILE)).read())
    [entry] = results["task_evaluations"]
    examples = load_image_qa_examples(data, "test")
    assert entry["dataset"] == {"name": "data:test", "sha256": examples.sha256(), "num_examples": 6}
    assert entry["settings"]["candidates"] == sorted(set(examples.answers)) == ["0", "1", "2", "3", "4", "5"]
    assert "--image-text" in results["command"] and "image_text_agreement" in results["wall_times_s"]

    # the value, recomputed by hand: the right answer's mean log-prob per token is the highest of the six
    model = AutoModelForImageTextToText.from_pretrained(vlm).eval()
    task = ImageQATask.from_pretrained(vlm, QUESTION)
    agree = 0
    for image, answer in zip(examples.images, examples.answers):
        scores = []
        for candidate in entry["settings"]["candidates"]:
            prompt, reply = task.prompt_ids(QUESTION), task.answer_ids(candidate)
            ids = torch.tensor([prompt + reply])
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=task.pixel_values([image])).logits[0].float()
            log_probs = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
            scores.append(log_probs.gather(-1, torch.tensor(reply)[:, None]).mean())
        agree += int(int(torch.stack(scores).argmax()) == entry["settings"]["candidates"].index(answer))
    assert entry["value"] == agree / 6

    card = str(render_card(vlm, "org/tiny-vlm"))
    header = yaml.safe_load(card.split("---")[1])
    metrics = [m for r in header["model-index"][0]["results"] for m in r["metrics"]]
    assert {"type": "image_text_agreement", "value": entry["value"], "config": "examples=6"} in metrics
    assert "## Task evaluation" in card and "| image_text_agreement |" in card


def test_tiled_image_scores_like_its_tiles_in_the_prompt(vlm_and_data):
    vlm, data = vlm_and_data
    model = AutoModelForImageTextToText.from_pretrained(vlm).eval()
    task = ImageQATask.from_pretrained(vlm, QUESTION)
    pixels = task.pixel_values(load_image_qa_examples(data, "test").images[:1])  # [1, C, H, W]
    candidates = [task.answer_ids(a) for a in ("3", "4")]
    one = ImageTextExample(task.prompt_ids(QUESTION), pixels[0], candidates, 0)
    torch.testing.assert_close(candidate_scores(model, one),
                               candidate_scores(model, ImageTextExample(one.prefix_ids, pixels, candidates, 0)))
    two_tiles = ImageTextExample(task.prompt_ids(QUESTION, 2), torch.cat([pixels, pixels.flip(-1)]), candidates, 0)
    assert candidate_scores(model, two_tiles).shape == (2,)  # one image feature per tile's context tokens


def test_bad_image_text_inputs_fail_before_the_model_loads(vlm_and_data, qwen3_dir, tmp_path, monkeypatch):
    vlm, data = vlm_and_data
    text = tmp_path / "held_out.txt"
    text.write_text("x" * 200)
    examples = load_image_qa_examples(data, "test")
    loaded = []
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", lambda *a, **k: loaded.append(a))
    with pytest.raises(ValueError, match="`question` is needed"):
        evaluate_checkpoint(vlm, str(text), image_text=examples, write=False)
    with pytest.raises(ValueError, match="needs >= 2 distinct answers"):
        evaluate_checkpoint(vlm, str(text), image_text=examples.head(1), question=QUESTION, write=False)
    open_ended = ImageQAExamples(examples.images[:1] * 65, [f"answer {i}" for i in range(65)], "open")
    with pytest.raises(ValueError, match="65 distinct answers; the agreement is a closed-set metric"):
        evaluate_checkpoint(vlm, str(text), image_text=open_ended, question=QUESTION, write=False)
    with pytest.raises(ValueError, match="not a vision-language model"):
        evaluate_checkpoint(qwen3_dir, str(text), image_text=examples, question=QUESTION, write=False)
    with pytest.raises(ValueError, match="with a 'validation' split, has \\['test', 'train'\\]"):
        load_image_qa_examples(data, "validation")
    assert not loaded


def test_cli_rejects_a_bad_example_count(vlm_and_data, tmp_path, capsys):
    vlm, data = vlm_and_data
    text = tmp_path / "held_out.txt"
    text.write_text("x" * 200)
    assert main(["evaluate", vlm, "--text", str(text), "--image-text", data, "--question", QUESTION,
                 "--max-examples", "-1"]) == 2
    assert "`--max-examples` must be >= 1, got -1" in capsys.readouterr().err
