"""Timings of VQCGeneratedLinear on CPU, printed as markdown tables for BENCHMARKS.md.

1. Training step (generate W from the circuit + hypernetwork, forward, backward) at 4, 6, 8 wires, beside a
   dense nn.Linear of the same shape on the same input, plus the circuit alone and the noise options.
2. Eval forward: the cached generated weight (two thin matmuls) against the dense Linear, and against
   regenerating the weight on every call (what the cache saves).

Every ratio is measured side by side: the compared calls alternate within one loop; the best (minimum) and
the median of the repeats are kept, and the tables show the best, the least disturbed by other jobs on a
shared machine.
The machine's 1-minute load is printed with the tables; with `--max_load` the script first waits (up to
`--max_wait` seconds) for the load to drop below it.

    nice -n 19 python bench/vqc.py                # 576 -> 1536 (a SmolLM2-135M up_proj), 64 tokens
    nice -n 19 python bench/vqc.py --threads 1 --repeats 30
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

from riverone_hf.modeling.vqc_linear import VQCGeneratedLinear


def load1() -> float:
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def wait_for_quiet(max_load: float, max_wait: float) -> None:
    deadline = time.time() + max_wait
    while load1() >= max_load and time.time() < deadline:
        time.sleep(15)
    print(f"1-minute load at start: {load1():.2f} (waited for < {max_load}, at most {max_wait:.0f} s)", flush=True)


def side_by_side(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Best (minimum) milliseconds of each callable over `repeats` calls interleaved round-robin; the
    medians are printed (as an HTML comment, before the row) as a check on noise."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000)
    medians = ", ".join(f"{name} {statistics.median(values):.2f}" for name, values in times.items())
    print(f"<!-- medians ms: {medians} -->", flush=True)
    return {name: min(values) for name, values in times.items()}


def train_step(module: nn.Module, x: torch.Tensor):
    def step():
        module.zero_grad(set_to_none=True)
        module(x).square().mean().backward()
    return step


def circuit_step(module: VQCGeneratedLinear):
    def step():
        module.zero_grad(set_to_none=True)
        module.features().sum().backward()
    return step


def make(args, **overrides) -> VQCGeneratedLinear:
    return VQCGeneratedLinear(args.in_features, args.out_features, seed=0, **overrides)


def training_table(args, x: torch.Tensor) -> None:
    dense = nn.Linear(args.in_features, args.out_features)
    print("\n| training step | wires | VQC generate+fwd+bwd ms | circuit fwd+bwd ms | dense Linear fwd+bwd ms | VQC / dense |")
    print("|---|---|---|---|---|---|")
    cases = [("noise-free", {"n_wires": w}) for w in args.wires]
    cases += [("sampled noise p=0.01", {"n_wires": 4, "noise_probability": 0.01}),
              ("exact noise p=0.01 (default.mixed)", {"n_wires": 4, "noise_probability": 0.01, "exact_noise": True})]
    for label, overrides in cases:
        module = make(args, **overrides).train()
        ms = side_by_side({"vqc": train_step(module, x), "circuit": circuit_step(module), "dense": train_step(dense, x)},
                          args.repeats)
        print(f"| {label} | {overrides['n_wires']} | {ms['vqc']:.2f} | {ms['circuit']:.2f} | {ms['dense']:.3f} | "
              f"{ms['vqc'] / ms['dense']:.1f} |", flush=True)


def eval_table(args) -> None:
    dense = nn.Linear(args.in_features, args.out_features).eval()
    module = make(args, n_wires=4).eval()
    print("\n| eval forward (no_grad) | tokens | dense Linear ms | VQC cached ms | VQC regenerated each call ms | "
          "cached / dense |")
    print("|---|---|---|---|---|---|")
    for tokens in args.eval_tokens:
        x = torch.randn(tokens, args.in_features)

        def regenerate(x=x):
            module._cache = None  # what every call would cost without the cache
            module(x)

        with torch.no_grad():
            calls = {"dense": lambda x=x: dense(x), "cached": lambda x=x: module(x), "regen": regenerate}
            ms = side_by_side(calls, args.repeats * 3)
        print(f"| 4 wires | {tokens} | {ms['dense']:.3f} | {ms['cached']:.3f} | {ms['regen']:.2f} | "
              f"{ms['cached'] / ms['dense']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in_features", type=int, default=576)
    parser.add_argument("--out_features", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=64, help="rows of the training-step input")
    parser.add_argument("--eval_tokens", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--wires", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--max_load", type=float, default=1.0)
    parser.add_argument("--max_wait", type=float, default=900)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wait_for_quiet(args.max_load, args.max_wait)
    import pennylane

    print(f"shape {args.in_features} -> {args.out_features}, rank 8, hidden 32, chunk 64, 2 circuit layers; "
          f"torch {torch.__version__}, PennyLane {pennylane.__version__}, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; best of {args.repeats} "
          f"interleaved calls (eval: {3 * args.repeats})", flush=True)
    training_table(args, torch.randn(args.tokens, args.in_features))
    eval_table(args)
    print(f"\n1-minute load at end: {load1():.2f}")


if __name__ == "__main__":
    main()
