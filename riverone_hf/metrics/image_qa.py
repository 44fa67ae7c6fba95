"""Labelled-image question answering on an InternVL-style checkpoint: prompts, training examples, batches, answer
accuracy and image-text agreement examples, shared by `riverone evaluate` and the recipes that train and measure
a vision-language model (`recipes/riverone_qc.py`, `recipes/build_digit_vlm.py`).

Each example is an image and its answer (a short text: "7"). The prompt is the checkpoint's own chat template
(an optional system turn, then the user turn "<image>\\n{question}"), with the image placeholder expanded the way
transformers' `InternVLProcessor` expands it (start token, `image_seq_length` context tokens, end token: the
tokenizer's `start_image_token` / `context_image_token` / `end_image_token`). Training examples carry labels on
the answer tokens only (what the chat template puts after the generation prompt, up to the end-of-sequence token).
Accuracy: greedy decoding; right when the generated text, stripped, equals the answer. Agreement
(`riverone_hf.metrics.image_text`): the right answer scores highest among the candidates (by default the split's
distinct answers), no generation.

Data on disk: a `datasets` directory (`save_to_disk`) holding a DatasetDict whose splits have `image` (PIL
images) and `answer` (text) columns, and optionally `question` (one question per example, e.g. an SFT set; else
every example gets the task's question).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch

from .image_text import ImageTextExample

__all__ = ["ImageQAExamples", "ImageQATask", "load_image_qa_examples"]


@dataclass
class ImageQAExamples:
    """Images (PIL), their answers and, when the data has them, one question each (else the task's question)."""

    images: list
    answers: list[str]
    name: str
    questions: list[str] | None = None

    def __len__(self) -> int:
        return len(self.answers)

    def head(self, n: int | None) -> ImageQAExamples:
        if n is None or n >= len(self):
            return self
        return ImageQAExamples(self.images[:n], self.answers[:n], self.name, self.questions and self.questions[:n])

    def question(self, index: int, default: str) -> str:
        return self.questions[index] if self.questions else default

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for index, (image, answer) in enumerate(zip(self.images, self.answers)):
            digest.update(image.tobytes())
            digest.update(answer.encode("utf-8"))
            if self.questions:
                digest.update(self.questions[index].encode("utf-8"))
        return digest.hexdigest()


def load_image_qa_examples(path: str, split: str) -> ImageQAExamples:
    """Split `split` of the `datasets` directory `path` (see the module docstring). ValueError for another shape."""
    if not os.path.isdir(path):
        raise ValueError(f"image-text data {path!r} is not a directory (a `datasets` save_to_disk folder expected)")
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(path)
    if not isinstance(loaded, DatasetDict) or split not in loaded:
        found = sorted(loaded) if isinstance(loaded, DatasetDict) else "not a DatasetDict"
        raise ValueError(f"image-text data {path!r} must hold a DatasetDict with a {split!r} split, has {found}")
    part = loaded[split]
    if not {"image", "answer"} <= set(part.column_names):
        raise ValueError(f"split {split!r} of {path!r} needs columns 'image' and 'answer' (and optionally "
                         f"'question'), has {sorted(part.column_names)}")
    questions = [str(q) for q in part["question"]] if "question" in part.column_names else None
    return ImageQAExamples([image.convert("RGB") for image in part["image"]], [str(a) for a in part["answer"]],
                           f"{os.path.basename(os.path.normpath(path))}:{split}", questions)


class ImageQATask:
    """Prompts, training examples, batches and accuracy for one checkpoint's tokenizer and image processor.
    An image the processor cuts into N tiles (`crop_to_patches`) gets N x `image_seq_length` context tokens."""

    def __init__(self, tokenizer, image_processor, image_seq_length: int, question: str, system: str | None = None):
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat template; the task builds its prompts with it")
        missing = [n for n in ("start_image_token", "context_image_token", "end_image_token")
                   if not getattr(tokenizer, n, None)]
        if missing:
            raise ValueError(f"the tokenizer lacks InternVL's image tokens {missing} "
                             "(`extra_special_tokens` in tokenizer_config.json)")
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_seq_length = image_seq_length
        self.question, self.system = question, system
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, model_dir: str, question: str, system: str | None = None) -> ImageQATask:
        """The task for a checkpoint folder: its tokenizer, image processor and image tokens per tile."""
        from transformers import AutoImageProcessor, AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(model_dir), AutoImageProcessor.from_pretrained(model_dir),
                       cls._image_seq_length(model_dir), question, system)
        except ValueError as err:
            raise ValueError(f"{model_dir!r}: {err}") from err

    @staticmethod
    def _image_seq_length(model_dir: str) -> int:
        """Context tokens per tile: the processor's `image_seq_length`, else (image / patch)^2 * downsample^2."""
        path = os.path.join(model_dir, "processor_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                recorded = json.load(handle).get("image_seq_length")
            if recorded:
                return int(recorded)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        vision = config.vision_config
        return int((vision.image_size[0] // vision.patch_size[0]) * (vision.image_size[1] // vision.patch_size[1])
                   * config.downsample_ratio**2)

    def _messages(self, question: str, answer: str | None = None) -> list[dict]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": f"{self.tokenizer.context_image_token}\n{question}"})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def _ids(self, messages: list[dict], tiles: int, add_generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        tokens = self.tokenizer
        image = (tokens.start_image_token + tokens.context_image_token * (self.image_seq_length * tiles)
                 + tokens.end_image_token)
        return tokens(text.replace(tokens.context_image_token, image, 1), add_special_tokens=False)["input_ids"]

    def prompt_ids(self, question: str, tiles: int = 1) -> list[int]:
        """The prompt up to the assistant's answer, for an image of `tiles` tiles."""
        return self._ids(self._messages(question), tiles, add_generation_prompt=True)

    def answer_ids(self, answer: str, question: str | None = None, tiles: int = 1) -> list[int]:
        """The tokens the chat template puts after the generation prompt for `answer`, up to and including the
        end-of-sequence token (where generation stops: text the template puts after it, such as a newline, is never
        generated, so it is neither trained on nor scored)."""
        question = self.question if question is None else question
        prompt = self.prompt_ids(question, tiles)
        full = self._ids(self._messages(question, answer), tiles, add_generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template does not render the prompt as a prefix of the whole conversation")
        reply = full[len(prompt):]
        eos = self.tokenizer.eos_token_id
        return reply[: reply.index(eos) + 1] if eos in reply else reply

    def pixel_values(self, images: list) -> torch.Tensor:
        """The tiles of `images`, concatenated ([sum of tiles, C, H, W])."""
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def _encoded(self, examples: ImageQAExamples, index: int) -> tuple[str, torch.Tensor]:
        pixels = self.pixel_values([examples.images[index]])
        return examples.question(index, self.question), pixels

    def training_examples(self, examples: ImageQAExamples) -> list[dict]:
        """One dict per example: input_ids, labels (-100 but on the answer), pixel_values [tiles, C, H, W]."""
        rows = []
        for index, answer in enumerate(examples.answers):
            question, pixels = self._encoded(examples, index)
            prompt = self.prompt_ids(question, len(pixels))
            ids = prompt + self.answer_ids(answer, question, len(pixels))
            rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt):], "pixel_values": pixels})
        return rows

    def collate(self, features: list[dict]) -> dict:
        """Right-padded InternVL batch; the examples' tiles concatenated in order."""
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id)
        labels = torch.full((len(features), width), -100)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.tensor(feature["input_ids"])
            labels[row, :n] = torch.tensor(feature["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "pixel_values": torch.cat([f["pixel_values"] for f in features])}

    @torch.no_grad()
    def accuracy(self, model, examples: ImageQAExamples, batch_size: int = 50) -> dict:
        """Greedy answers to the held-out examples; right when the stripped text equals the answer. Examples
        are batched only with prompts of the same length (no padding, so a batch answers exactly as one example
        alone would); at most as many new tokens as the longest answer of the batch has."""
        from tqdm.auto import tqdm

        model.eval()
        by_prompt: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for index in range(len(examples)):
            question, pixels = self._encoded(examples, index)
            by_prompt.setdefault((question, len(pixels)), []).append((index, pixels))
        batches = [(key, group[i : i + batch_size]) for key, group in by_prompt.items()
                   for i in range(0, len(group), batch_size)]
        right = 0
        for (question, tiles), batch in tqdm(batches, desc="answer accuracy", leave=False):
            answers = [examples.answers[index] for index, _ in batch]
            ids = torch.tensor([self.prompt_ids(question, tiles)] * len(batch))
            longest = max(len(self.answer_ids(a, question, tiles)) for a in answers)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 pixel_values=torch.cat([p for _, p in batch]), max_new_tokens=longest,
                                 do_sample=False, pad_token_id=self.pad_token_id)
            for generated, answer in zip(out[:, ids.shape[1]:], answers):
                right += int(self.tokenizer.decode(generated, skip_special_tokens=True).strip() == answer.strip())
        return {"accuracy": right / len(examples), "right": right, "examples": len(examples)}

    def agreement_examples(self, examples: ImageQAExamples) -> tuple[list[ImageTextExample], list[str]]:
        """Image-text agreement examples of `examples` (each answer scored against every distinct answer of
        `examples`) and those candidates, sorted. ValueError when fewer than two distinct answers."""
        choices = sorted(set(examples.answers))
        if len(choices) < 2:
            raise ValueError(f"image-text agreement needs >= 2 distinct candidate answers, got {choices}")
        answer_tokens: dict[tuple[str, int], list[list[int]]] = {}
        out = []
        for index, answer in enumerate(examples.answers):
            question, pixels = self._encoded(examples, index)
            key = (question, len(pixels))
            if key not in answer_tokens:
                answer_tokens[key] = [self.answer_ids(choice, question, len(pixels)) for choice in choices]
            out.append(ImageTextExample(self.prompt_ids(question, len(pixels)), pixels, answer_tokens[key],
                                        choices.index(answer)))
        return out, choices
