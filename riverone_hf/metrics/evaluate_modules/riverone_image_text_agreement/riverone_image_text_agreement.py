"""riverone image-text agreement: an `evaluate` metric over `riverone_hf.metrics.image_text.image_text_agreement`.

Loaded offline by local path. Inputs: ``references`` = the index of the right candidate of each example (checked
against the examples' own labels). Compute keywords: ``model`` (a vision-language model whose forward takes
``input_ids``, ``attention_mask`` and ``pixel_values``), ``examples`` (`ImageTextExample`s, built with the model's
processor), ``pad_token_id``. Definition: each candidate is scored by its mean log-probability per token given
the image and the prompt; an example agrees when its right candidate scores highest; agreement = the fraction
of agreeing examples.
"""

import datasets
import evaluate

from riverone_hf.metrics.evaluate_modules import metric_info
from riverone_hf.metrics.image_text import image_text_agreement

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    references (list of int): index of the right candidate of each example.
    model: a vision-language model (transformers *ForConditionalGeneration / AutoModelForImageTextToText).
    examples (list of ImageTextExample): prompt ids (image tokens included), pixel values, candidates, label.
    pad_token_id (int): id used to right-pad the candidates (masked out). Default 0.
Returns:
    agreement (float in [0, 1]), num_examples (int), mean_right_log_prob_per_token (float, nats).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RiverOneImageTextAgreement(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, {"references": datasets.Value("int64")})

    def _compute(self, references, model=None, examples=None, pad_token_id=0):
        if model is None or examples is None:
            raise ValueError("riverone_image_text_agreement needs `model=` and `examples=` keyword arguments")
        if list(references) != [e.label for e in examples]:
            raise ValueError("`references` must equal the examples' labels, in order")
        return image_text_agreement(model, examples, pad_token_id=pad_token_id)
