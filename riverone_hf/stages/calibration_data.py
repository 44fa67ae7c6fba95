"""Calibration text for the stages that fit to layer inputs (AQLM, VQC): its spec, the check that it can be
read before work starts, and the token windows drawn from it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..config import StagePlan
from ..validation import require, require_int, require_str


@dataclass
class CalibrationSpec:
    """Local text used to collect XᵀX per Linear for output-aware compression.

    Exactly one source: `text_files` (plain UTF-8 files, concatenated) or `dataset_path`
    (a directory written by `datasets` `save_to_disk`, read with `load_from_disk`).

    Args:
        text_files (`list[str]`, optional): paths of plain text files.
        dataset_path (`str`, optional): a local `datasets` directory (a Dataset or a DatasetDict).
        text_column (`str`, defaults to "text"): the column holding text in `dataset_path`.
        split (`str`, defaults to "train"): the split used when `dataset_path` holds a DatasetDict.
        tokenizer (`str`, optional): tokenizer path or id; defaults to the model's own directory.
        num_samples (`int`, defaults to 128): number of token windows drawn.
        seq_len (`int`, defaults to 512): tokens per window.
        seed (`int`, defaults to 0): seed for drawing the windows.
    """

    text_files: list[str] | None = field(default=None, metadata={"help": "Plain UTF-8 text files."})
    dataset_path: str | None = field(default=None, metadata={"help": "A local `datasets` save_to_disk directory."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text in `dataset_path`."})
    split: str = field(default="train", metadata={"help": "Split used when `dataset_path` holds a DatasetDict."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer path; default: the model's directory."})
    num_samples: int = field(default=128, metadata={"help": "Number of token windows, >= 1."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per window, >= 2."})
    seed: int = field(default=0, metadata={"help": "Seed for drawing the windows, >= 0."})

    def __post_init__(self):
        require(
            (self.text_files is None) != (self.dataset_path is None),
            "`calibration` needs exactly one of `text_files` (list of paths) or `dataset_path` (a local "
            f"`datasets` directory); got text_files={self.text_files!r}, dataset_path={self.dataset_path!r}",
        )
        if self.text_files is not None:
            require(
                isinstance(self.text_files, list) and self.text_files and all(isinstance(p, str) for p in self.text_files),
                f"`calibration.text_files` must be a non-empty list of paths, got {self.text_files!r}",
            )
            for path in self.text_files:
                require_str("calibration.text_files[]", path, allow_empty=False)
        for name in ("dataset_path", "tokenizer"):
            value = getattr(self, name)
            require(value is None or isinstance(value, str), f"`calibration.{name}` must be a string, got {value!r}")
            if value is not None:
                require_str(f"calibration.{name}", value, allow_empty=False)
        for name in ("text_column", "split"):
            value = getattr(self, name)
            require(isinstance(value, str), f"`calibration.{name}` must be a string, got {value!r}")
            require_str(f"calibration.{name}", value)
        require_int("calibration.num_samples", self.num_samples, 1, 1_000_000)
        require_int("calibration.seq_len", self.seq_len, 2, 1_000_000)
        require_int("calibration.seed", self.seed, 0, 2**63 - 1)


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


class CalibratedStage:
    """`check` and `plan` shared by the stages that convert Linears, fitted to calibration inputs when their
    spec has a `calibration` (AQLM, VQC). A subclass sets `name` and `select(model, spec, claimed)`, which
    returns the modules to convert and raises ValueError on the meta skeleton."""

    name: str

    def check(self, spec) -> None:
        if spec.calibration is not None:
            check_calibration_source(spec.calibration)

    def plan(self, model, spec, claimed: set[str]) -> StagePlan:
        windows = None if spec.calibration is None else calibration_windows(model, spec.calibration, self.name)
        return StagePlan(self.select(model, spec, claimed), windows)
