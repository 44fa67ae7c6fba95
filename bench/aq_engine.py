"""AQ engine benchmark: one weight matrix at a time, against the reference AQLM figures.

    python bench/aq_engine.py                       # every row, 3 timed runs each
    python bench/aq_engine.py --rows 2x8 1x16 --repeats 5

Rows (`--rows`):
  public problem (`make_problem.py` of ../shared/aq_reference, 1024x1024, XᵀX from 4096 rows):
    2x8, 2x8-data-free, 1x16, 1x16-data-free, rtn-g128
  real layer (`--layer` of SmolLM2-135M-Instruct, XᵀX from `--calib-samples` x `--seq-len` tokens of the
  shipped calibration text, Pride and Prejudice, collected with `collect_xtx` on the dense model):
    smol-2x8, smol-2x8-data-free, smol-rtn-g128

Every timed run is a fresh child process (`torch.set_num_threads(--threads)`), so its peak RSS (VmHWM of
the child, i.e. its own ru_maxrss without what Linux carries over from the parent at fork + exec: Python +
torch + the problem + the engine) is the peak of that run alone. Errors are those of the quantized weight:
relative output error trace(ΔW XᵀX ΔWᵀ) / trace(W XᵀX Wᵀ) on the row's own XᵀX (also for the data-free
rows, which never see it) and relative weight error ||ΔW||² / ||W||², both in float64. Bits/weight count
codes at B bits and codebooks and scales as fp16 (how they are shipped), whatever dtype the engine returns
them in. Before each run the script waits (up to `--max-wait` s) for the 1-minute load average to fall
below `--max-load`, and it prints the load before and after every run: the machine is shared, and timings
under load are not comparable. The same seed must give identical codes in every repeat; the table says
whether it did.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from machine_info import machine  # noqa: E402  (bench/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Figures of the reference AQLM code on the public problem (../shared/aq_reference/REFERENCE.md, measured
# 2026-11-27 on a 2-core Intel Xeon, torch 2.13 CPU, 2 threads): (setting, rel. output err, rel. weight err,
# wall s, peak RSS MiB).
REFERENCE = {
    "2x8": ("beam 8, 3 epochs, 100 k-means iters", 0.01349, 0.287, 108.8, 591),
    "2x8-beam1": ("beam 1, 3 epochs, 100 k-means iters", 0.01463, 0.301, 73.3, 525),
    "1x16": ("beam 1, 1 epoch, 1 k-means iter", 0.00373, 0.047, 258.4, 4390),
    "rtn-g128": ("2-bit RTN g128, scale+zero", 0.1591, 0.328, 0.1, 460),
}

# The engine settings of each row; None fields keep the AqlmSpec defaults.
ROWS = {
    "2x8": dict(
        problem="public", calibrated=True, spec=dict(num_codebooks=2, nbits_per_codebook=8, in_group_size=8)
    ),
    "2x8-data-free": dict(
        problem="public", calibrated=False, spec=dict(num_codebooks=2, nbits_per_codebook=8, in_group_size=8)
    ),
    "1x16": dict(
        problem="public",
        calibrated=True,
        spec=dict(num_codebooks=1, nbits_per_codebook=16, in_group_size=8, beam_size=1, max_epochs=2, kmeans_iters=1),
    ),
    "1x16-data-free": dict(
        problem="public",
        calibrated=False,
        spec=dict(num_codebooks=1, nbits_per_codebook=16, in_group_size=8, beam_size=1, max_epochs=2, kmeans_iters=1),
    ),
    "rtn-g128": dict(problem="public", calibrated=False, rtn_group=128),
    "smol-2x8": dict(
        problem="layer", calibrated=True, spec=dict(num_codebooks=2, nbits_per_codebook=8, in_group_size=8)
    ),
    "smol-2x8-data-free": dict(
        problem="layer", calibrated=False, spec=dict(num_codebooks=2, nbits_per_codebook=8, in_group_size=8)
    ),
    "smol-rtn-g128": dict(problem="layer", calibrated=False, rtn_group=128),
}


def load_average() -> float:
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Sleep until the 1-minute load average is below `max_load` or `max_wait` seconds passed; return it."""
    deadline = time.monotonic() + max_wait
    load = load_average()
    while load >= max_load and time.monotonic() < deadline:
        time.sleep(10)
        load = load_average()
    return load


def rtn_dequantized(weight, group: int):
    """2-bit asymmetric round-to-nearest, one scale and one zero point per `group` consecutive inputs of a row.

    The GPTQ-style quantizer (the range is widened to include 0, the zero point is an integer level):
    scale = (max - min) / 3, zero = round(-min / scale), q = clamp(round(w / scale) + zero, 0, 3),
    ŵ = scale (q - zero). It reproduces the reference's RTN row on the public problem exactly
    (0.1591 / 0.328); plain min-max levels (zero = min) give 0.211 / 0.495 there.
    """
    w = weight.reshape(-1, group)
    low = w.min(-1, keepdim=True).values.clamp(max=0)
    high = w.max(-1, keepdim=True).values.clamp(min=0)
    scale = (high - low).clamp_min(1e-12) / 3
    zero = (-low / scale).round()
    q = ((w / scale).round() + zero).clamp(0, 3)
    return (scale * (q - zero)).reshape_as(weight)


# ---- data preparation (parent) ---------------------------------------------------------------------------


def prepare_public(problem_dir: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(problem_dir))
    from make_problem import make  # the reference's own generator

    torch.set_num_threads(1)  # as make_problem.py does: reproducible float64 summation order
    tensors = make()
    save_file({"W": tensors["W"], "XTX": tensors["XTX"]}, str(out))


def prepare_layer(layer: str, samples: int, seq_len: int, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from riverone_hf.cli.demo_assets import load_smollm2, read_shipped_text
    from riverone_hf.metrics.perplexity import token_windows
    from riverone_hf.aq.calibration import collect_xtx

    model, tokenizer = load_smollm2(torch.float32)
    windows = token_windows(tokenizer, read_shipped_text("calibration"), samples, seq_len, seed=0)
    linear = model.get_submodule(layer)
    with collect_xtx({layer: linear}) as accumulators, torch.no_grad():
        for window in windows:
            model(input_ids=window[None], use_cache=False)
    xtx = accumulators[layer].xtx()
    save_file({"W": linear.weight.detach().float().contiguous(), "XTX": xtx.contiguous()}, str(out))
    return {"layer": layer, "shape": list(linear.weight.shape), "rows": accumulators[layer].rows}


# ---- one timed run (child) -------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB: VmHWM of /proc/self/status.

    The same figure as `resource.getrusage(RUSAGE_SELF).ru_maxrss`, except that Linux carries ru_maxrss over
    fork + exec, so a child started by a parent holding a 1 GB model would report at least that; VmHWM
    starts afresh at exec. Falls back to ru_maxrss where /proc is missing.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(row: str, data: str, threads: int) -> None:
    import torch
    from safetensors.torch import load_file

    from riverone_hf import AqlmSpec
    from riverone_hf.aq import quantize_weight, relative_output_error
    from riverone_hf.aq.layout import unpack_codes

    torch.set_num_threads(threads)
    config = ROWS[row]
    tensors = load_file(data)
    weight, xtx = tensors["W"], tensors["XTX"]
    rss_before = peak_rss_mib()
    started, cpu_started = time.perf_counter(), time.process_time()
    if "rtn_group" in config:
        dequantized = rtn_dequantized(weight, config["rtn_group"])
        codes_digest = hashlib.sha256(dequantized.numpy().tobytes()).hexdigest()
        bits = 2 + 2 * 16 / config["rtn_group"]  # 2-bit codes + fp16 scale and zero per group
        setting = f"2-bit RTN g{config['rtn_group']}, scale+zero"
    else:
        spec = AqlmSpec(**config["spec"])
        quantized = quantize_weight(weight, xtx if config["calibrated"] else None, spec)
        dequantized = quantized.dequantize()
        codes_digest = hashlib.sha256(unpack_codes(quantized.codes, quantized.nbits_per_codebook).numpy().tobytes())
        codes_digest = codes_digest.hexdigest()
        stored = quantized.storage_bits()
        bits = (stored["codes"] + 16 * quantized.codebooks.numel() + 16 * quantized.scales.numel()) / weight.numel()
        setting = (
            f"beam {spec.beam_size}, <= {spec.max_epochs} rounds (tol {spec.relative_tolerance}), "
            f"{spec.codebook_optimizer} {spec.steps_per_epoch} steps, k-means <= {spec.kmeans_iters} iters"
        )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    result = {
        "row": row,
        "setting": setting,
        "bits": bits,
        "output_error": relative_output_error(weight, dequantized, xtx),
        "weight_error": relative_output_error(weight, dequantized),
        "wall": wall,
        "cpu": cpu,
        "peak_mib": peak_rss_mib(),
        "rss_before_mib": rss_before,
        "digest": codes_digest,
        "shape": list(weight.shape),
    }
    print("RESULT " + json.dumps(result))


# ---- driver ----------------------------------------------------------------------------------------------


def run_child(row: str, data: Path, threads: int) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", row, "--data", str(data), "--threads", str(threads)],
        capture_output=True,
        text=True,
        cwd=str(REPO),
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"row {row} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem-dir", default=str(REPO.parent / "shared" / "aq_reference"))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layer", default="model.layers.12.mlp.down_proj")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-load", type=float, default=0.7)
    parser.add_argument("--max-wait", type=float, default=300)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.threads)
        return

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} (CPU), "
          f"python {info['python']}, torch threads {args.threads}; date {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory(prefix="aq-engine-bench-") as tmp:
        data = {}
        if any(ROWS[r]["problem"] == "public" for r in args.rows):
            data["public"] = Path(tmp) / "public.safetensors"
            prepare_public(Path(args.problem_dir).resolve(), data["public"])
            print(f"public problem: make_problem.make() from {Path(args.problem_dir).resolve()}")
        if any(ROWS[r]["problem"] == "layer" for r in args.rows):
            data["layer"] = Path(tmp) / "layer.safetensors"
            layer_info = prepare_layer(args.layer, args.calib_samples, args.seq_len, data["layer"])
            print(f"real layer: SmolLM2-135M-Instruct {layer_info['layer']} {layer_info['shape']}, XᵀX from "
                  f"{layer_info['rows']} tokens of the shipped calibration text")

        results = {}
        for row in args.rows:
            runs = []
            for repeat in range(args.repeats):
                load_before = wait_for_quiet(args.max_load, args.max_wait)
                result = run_child(row, data[ROWS[row]["problem"]], args.threads)
                result["load_before"], result["load_after"] = load_before, load_average()
                runs.append(result)
                print(f"  {row} run {repeat + 1}: err {result['output_error']:.5f}, {result['wall']:.1f} s wall, "
                      f"{result['cpu']:.1f} s cpu, peak {result['peak_mib']:.0f} MiB, "
                      f"load {result['load_before']:.2f} -> {result['load_after']:.2f}", flush=True)
            results[row] = runs

    print()
    print("| row | shape | setting | bits/weight (fp16 codebooks+scales) | rel. output err | rel. weight err "
          "| wall s, median (min-max) | cpu s | peak RSS MiB | same codes every run | load before->after "
          "| reference: err, wall s (ratio ref/ours) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row, runs in results.items():
        walls = [r["wall"] for r in runs]
        first = runs[0]
        identical = all(r["digest"] == first["digest"] for r in runs)
        errors = {round(r["output_error"], 12) for r in runs}
        reference = REFERENCE.get(row)
        ref_cell = "–"
        if reference is not None:
            ref_cell = f"{reference[1]:.5f}, {reference[3]:.1f} s ({reference[3] / statistics.median(walls):.1f}x)"
        loads = ", ".join(f"{r['load_before']:.2f}->{r['load_after']:.2f}" for r in runs)
        print(
            f"| {row} | {first['shape'][0]}x{first['shape'][1]} | {first['setting']} | {first['bits']:.3f} "
            f"| {first['output_error']:.5f}{'' if len(errors) == 1 else ' (varies!)'} | {first['weight_error']:.4f} "
            f"| {statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) "
            f"| {statistics.median(r['cpu'] for r in runs):.1f} | {max(r['peak_mib'] for r in runs):.0f} "
            f"| {'yes' if identical else 'NO'} ({len(runs)} runs) | {loads} | {ref_cell} |"
        )
    print("\nreference figures: ../shared/aq_reference/REFERENCE.md (2-core Intel Xeon, 2 threads); for 2x8 the "
          "reference row is beam 8 / 3 epochs / 100 k-means iterations, for 1x16 beam 1 / 1 epoch / 1 k-means "
          "iteration.")
    print("peak RSS: VmHWM (= ru_maxrss, reset at exec) of the child process that ran the row, whole process.")


if __name__ == "__main__":
    main()
