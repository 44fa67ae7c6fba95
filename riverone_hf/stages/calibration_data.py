"""Reading the calibration text a `CalibrationSpec` names, and checking it exists before work starts."""

from __future__ import annotations

import os

from ..config import CalibrationSpec


def check_calibration_source(spec: CalibrationSpec) -> None:
    """Raise ValueError/ImportError now if the configured source cannot be read later."""
    if spec.text_files is not None:
        missing = [path for path in spec.text_files if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"`calibration.text_files` names files that do not exist: {missing}")
    else:
        if not os.path.isdir(spec.dataset_path):
            raise ValueError(f"`calibration.dataset_path` is not a directory: {spec.dataset_path!r}")
        try:
            import datasets  # noqa: F401
        except ImportError as err:
            raise ImportError("`calibration.dataset_path` needs the datasets package: pip install datasets") from err


def load_calibration_texts(spec: CalibrationSpec) -> list[str]:
    """The calibration documents: one string per text file, or the `text_column` of the dataset."""
    check_calibration_source(spec)
    if spec.text_files is not None:
        texts = []
        for path in spec.text_files:
            with open(path, encoding="utf-8") as handle:
                texts.append(handle.read())
        return texts
    import datasets

    data = datasets.load_from_disk(spec.dataset_path)
    if isinstance(data, datasets.DatasetDict):
        if spec.split not in data:
            raise ValueError(f"`calibration.split` {spec.split!r} is not in {spec.dataset_path}; splits: {list(data)}")
        data = data[spec.split]
    if spec.text_column not in data.column_names:
        raise ValueError(
            f"`calibration.text_column` {spec.text_column!r} is not a column of {spec.dataset_path}; "
            f"columns: {data.column_names}"
        )
    return [text for text in data[spec.text_column] if text]


def calibration_windows(model, spec: CalibrationSpec, stage: str):
    """Token windows [num_samples, seq_len] from the configured text, tokenised by the model's tokenizer.

    `stage` names the config section (`"aqlm"`, `"vqc"`) in error messages.
    """
    import torch
    from transformers import AutoTokenizer

    from ..metrics.perplexity import token_windows

    tokenizer_path = spec.tokenizer or model.config.name_or_path
    missing = (
        f"calibration needs a tokenizer; none could be loaded from {tokenizer_path!r} "
        f"(set `{stage}.calibration.tokenizer`)"
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except (OSError, ValueError) as err:
        raise ValueError(missing) from err
    texts = load_calibration_texts(spec)
    # transformers 5 builds an EMPTY tokenizer from config.json alone when a directory holds no tokenizer files
    sample = next((text for text in texts if text.strip()), "")
    if sample and not tokenizer(sample[:1000])["input_ids"]:
        raise ValueError(missing + "; the one found there turns text into no tokens")
    with torch.device("cpu"):  # the loader's hooks run inside a meta-device context
        return token_windows(tokenizer, texts, spec.num_samples, spec.seq_len, spec.seed)
