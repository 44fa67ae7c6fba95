"""Library entry points behind the CLI: load with the right Auto class, compress, save atomically."""

from __future__ import annotations

import logging
import os
import shutil
import time

import torch

from ..config import RiverOneConfig, get_stage
from ..fileio import atomic_output_dir, check_output_dir
from ..metrics.evaluation import write_quantization_record
from ..modeling.auto import auto_model_class

logger = logging.getLogger(__name__)

# Tokenizer / processor / generation files copied next to a compressed checkpoint.
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def copy_side_files(src: str, dst: str) -> None:
    """Copy the tokenizer / processor / generation files of folder `src` that `dst` lacks into `dst`."""
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src, name)) and not os.path.exists(os.path.join(dst, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def save_with_side_files(model, src: str, out: str, overwrite: bool = False,
                         quantization_seconds: float | None = None) -> None:
    """Save `model` to `out` atomically, with the tokenizer/processor/generation files of `src`, and, given
    `quantization_seconds`, the quantization record (`riverone_quantization.json`) of the saved weights."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(src, tmp)
        if quantization_seconds is not None:
            write_quantization_record(tmp, src, quantization_seconds)


def quantize_checkpoint(src: str, out: str, config: RiverOneConfig, dtype: torch.dtype = torch.float32,
                        overwrite: bool = False):
    """Load the dense checkpoint `src` with `config` (timed), then write the compressed model to `out`
    atomically, with its quantization record (wall time, machine) for `riverone evaluate` and the model card."""
    check_output_dir(out, overwrite)
    model_cls = auto_model_class(src)
    logger.info("loading %s with %s and quantization_config=%s", src, model_cls.__name__, config.to_dict())
    started = time.perf_counter()
    model = model_cls.from_pretrained(src, quantization_config=config, dtype=dtype)
    seconds = time.perf_counter() - started
    logger.info("compressed %s in %.1f s", src, seconds)
    save_with_side_files(model, src, out, overwrite, quantization_seconds=seconds)
    return model


def stage_reports(model) -> list[str]:
    """What each stage did to `model` (its `Stage.report` over the model's `quantization_map`), for printing."""
    config = model.config.quantization_config
    lines: list[str] = []
    for name, entries in config.map_entries_by_stage().items():
        lines += get_stage(name).report(model, entries)
    return lines
