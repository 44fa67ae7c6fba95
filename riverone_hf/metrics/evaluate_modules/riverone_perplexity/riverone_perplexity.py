"""riverone perplexity: an `evaluate` metric over `riverone_hf.metrics.perplexity.perplexity`.

Loaded offline by local path. Inputs: ``predictions`` = the texts (one or more strings; they are joined
with "\\n\\n" into ONE stream before tokenisation). Compute keywords: ``model``, ``tokenizer``, ``seq_len``,
``max_windows``, ``batch_size``. Definition (riverone_hf.metrics.perplexity): non-overlapping windows of
exactly ``seq_len`` tokens cut from the stream (tail dropped), ``seq_len - 1`` predictions per window,
exp(mean NLL in nats), float32 log-probabilities.
"""

import datasets
import evaluate

from riverone_hf.metrics.evaluate_modules import metric_info
from riverone_hf.metrics.perplexity import perplexity, tokenize_text

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the evaluation text(s), joined with two newlines into one token stream.
    model: a causal LM (transformers *ForCausalLM or a VLM whose forward takes input_ids).
    tokenizer: its tokenizer.
    seq_len (int): tokens per window (>= 2). Default 512.
    max_windows (int or None): evaluate only the first windows. Default None (all).
    batch_size (int): windows per forward. Default 1.
Returns:
    perplexity (float), num_tokens (int, tokens in the stream), num_windows (int), num_predicted_tokens (int).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RiverOnePerplexity(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, {"predictions": datasets.Value("string")})

    def _compute(self, predictions, model=None, tokenizer=None, seq_len=512, max_windows=None, batch_size=1):
        if model is None or tokenizer is None:
            raise ValueError("riverone_perplexity needs `model=` and `tokenizer=` keyword arguments")
        text = "\n\n".join(predictions)
        num_tokens = int(tokenize_text(tokenizer, text).numel())
        windows = num_tokens // seq_len if max_windows is None else min(num_tokens // seq_len, max_windows)
        value = perplexity(model, tokenizer, text, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size,
                           show_progress=False)
        return {"perplexity": value, "num_tokens": num_tokens, "num_windows": windows,
                "num_predicted_tokens": windows * (seq_len - 1)}
