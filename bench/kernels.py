"""AQLM CPU kernels vs dense fp32 `F.linear` vs the `aqlm` package, at Qwen3-4B MLP shapes.

    python bench/kernels.py            # full run (7 repeats)
    python bench/kernels.py --quick    # short run (3 repeats, batch 1 and 16)

Every timed call is a decode-style pass over `--layers` (>= 10) DISTINCT layers of one shape, so the
weights are not cache-resident (one 100 MB matrix called again and again stays in a large L3 and
makes dense look faster than it is inside a model). The three contenders run interleaved, one pass
each per repeat, and the table gives the median time per layer and the speed-up over dense measured
in the same run. The `aqlm` package runs its numba kernel (Kx8) with NUMBA_NUM_THREADS=1 -- the only
setting where that kernel is correct (it races with more threads) -- on its own copy of the codes
(it permutes them in place), in numba's workqueue threading layer (its default omp layer would
set torch's OpenMP thread count to 1 process-wide) and with OPENBLAS_NUM_THREADS=1 (its table-building
BLAS call would otherwise leave OpenBLAS threads spinning on the cores the next contender needs); for
1x16 on CPU it dequantizes the whole weight on every call.
Codes are random; codebooks are random fp16 values (as in published AQLM checkpoints); `err` is the
max |y - y_ref| / max |y_ref| against `F.linear(x, dequantize(...))`.
"""

from __future__ import annotations

import os

# Before numba is imported anywhere. NUMBA_NUM_THREADS=1: the aqlm kernel races with more threads.
# NUMBA_THREADING_LAYER=workqueue: numba's default "omp" layer shares torch's libgomp and sets ITS thread
# count (1) process-wide, so after one aqlm call torch itself would run on 1 thread (measured: torch 2.13,
# numba 0.68) and the dense / riverone columns would silently be single-threaded.
# OPENBLAS_NUM_THREADS=1: the aqlm numba kernel builds its table with a BLAS call through numpy/scipy's
# OpenBLAS, whose worker threads then busy-wait for a while and take a core from whatever runs next
# (measured: the riverone pass after an aqlm pass went from 1.1 to 2.5 ms per layer).
os.environ["NUMBA_NUM_THREADS"] = "1"
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from riverone_hf.kernels.cpu import cpu_kernels_available, cpu_matmul, prepare_cpu_kernel  # noqa: E402
from riverone_hf.aq.layout import dequantize, pack_codes  # noqa: E402
from machine_info import machine  # noqa: E402  (bench/ is on sys.path when run as a script)

SHAPES = [(2560, 9728), (9728, 2560)]  # (in_features, out_features): Qwen3-4B up/gate and down projections


def machine_line() -> str:
    info = machine()
    return f"{info['cpu']}, {info['cores']} cores available ({info['arch']}), torch {info['torch']}"


def aqlm_layer(codes, codebooks, scales):
    from aqlm.inference import QuantizedLinear

    num_codebooks, codebook_size, out_group, in_group = codebooks.shape
    layer = QuantizedLinear(
        codes.shape[1] * in_group, codes.shape[0] * out_group, in_group, out_group, num_codebooks,
        codebook_size.bit_length() - 1, bias=False,
    )
    with torch.no_grad():
        layer.codes.copy_(codes)  # its own copy: its first CPU forward permutes the codes in place
        layer.codebooks.copy_(codebooks)
        layer.scales.copy_(scales)
    return layer.eval()


class OtherLoad:
    """CPU time that OTHER processes (and the hypervisor's steal) took while a block of code ran.

    From /proc/stat (all CPUs) minus this process's own CPU time (os.times), in units of one CPU:
    0.0 = nobody else ran, 1.0 = one whole CPU was taken from us on average.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")

    def _read(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq
        steal = v[7] if len(v) > 7 else 0
        own = os.times()
        return busy, steal, (own.user + own.system) * self.tick, time.perf_counter()

    def __enter__(self):
        self.start = self._read()
        return self

    def __exit__(self, *exc):
        end = self._read()
        busy, steal, own, wall = (b - a for a, b in zip(self.start, end))
        seconds = max(wall, 1e-9)
        self.cpus = max(0.0, (busy - own + steal) / self.tick / seconds)
        return False


def time_passes(contenders: dict, repeats: int, max_other: float, max_seconds: float) -> tuple[dict, int, int, float]:
    """Median ms per layer for each contender over `repeats` CLEAN repeats.

    contenders: name -> list of zero-arg callables (one per layer). A repeat times one pass of each
    contender in turn; it is clean when other processes took < `max_other` CPUs during it. After a shared
    repeat the next one waits (sleeping) for a quiet second. Repeats run until `repeats` clean ones or
    `max_seconds`; then the cleanest `repeats` are used.
    Returns (medians, clean repeats, repeats run, median other load of the repeats used).
    """
    runs = []  # (other load, {name: ms per layer})
    deadline = time.monotonic() + max_seconds
    while True:
        if runs and runs[-1][0] >= max_other:
            # the last repeat was shared: wait, sleeping, for a quiet second before the next one
            while time.monotonic() < deadline:
                with OtherLoad() as idle:
                    time.sleep(1.0)
                if idle.cpus < max_other:
                    break
        with OtherLoad() as load:
            times = {}
            for name, calls in contenders.items():
                start = time.perf_counter()
                for call in calls:
                    call()
                times[name] = (time.perf_counter() - start) / len(calls) * 1e3
        runs.append((load.cpus, times))
        clean = sum(1 for other, _ in runs if other < max_other)
        if clean >= repeats or (time.monotonic() > deadline and len(runs) >= repeats):
            break
    used = sorted(runs, key=lambda run: run[0])[:repeats]
    medians = {name: statistics.median(t[name] for _, t in used) for name in contenders}
    return medians, min(clean, repeats), len(runs), statistics.median(other for other, _ in used)


def rel_err(y, ref) -> float:
    return float((y - ref).abs().max() / ref.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats (default 7)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--layers", type=int, default=10, help="distinct layers per timed pass (>= 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schemes", default="2x8,1x8,1x16")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--no-aqlm", action="store_true", help="skip the aqlm package")
    parser.add_argument(
        "--max-other", type=float, default=0.25, metavar="CPUS",
        help="a repeat counts as clean when other processes took less than this many CPUs during it (0.25; /proc/stat counts in 10 ms ticks)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=120.0,
        help="per row, keep repeating up to this long to collect clean repeats (then use the cleanest)",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    if args.layers < 10:
        parser.error("--layers must be >= 10 so that the weights are not cache-resident")
    if not cpu_kernels_available():
        sys.exit("riverone CPU kernels are unavailable here (see the warning above)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    schemes = [tuple(int(v) for v in s.split("x")) for s in args.schemes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    use_aqlm = not args.no_aqlm
    if use_aqlm:
        try:
            import aqlm  # noqa: F401
        except ImportError:
            use_aqlm = False

    header = [
        f"Machine: {machine_line()}",
        f"torch.set_num_threads({args.threads}); aqlm numba kernel with NUMBA_NUM_THREADS=1; {args.layers} distinct "
        f"layers per timed pass; median of {repeats} interleaved repeats (clean ones preferred, see end); ms per "
        "layer; speed-up = dense / x",
        f"load average at start: {os.getloadavg()[0]:.2f}",
    ]
    for line in header:
        print(line, flush=True)
    rows = []
    columns = (
        "| shape | scheme | batch | dense ms | riverone ms (kernel) | aqlm ms | riverone vs dense | aqlm vs dense "
        "| riverone vs aqlm | err riverone / aqlm | clean repeats (run), other CPUs |"
    )
    print(columns)
    print("|" + "---|" * (columns.count("|") - 1))
    for in_f, out_f in SHAPES:
        dense_w = [torch.randn(out_f, in_f) for _ in range(args.layers)]
        for num_codebooks, nbits in schemes:
            layers = []
            for _ in range(args.layers):
                codes = pack_codes(torch.randint(0, 2**nbits, (out_f, in_f // 8, num_codebooks)), nbits)
                codebooks = torch.randn(num_codebooks, 2**nbits, 1, 8).half().float()
                scales = torch.rand(out_f, 1, 1, 1) * 0.1 + 0.01
                prepared = prepare_cpu_kernel(codes, codebooks, scales)
                layers.append((codes, codebooks, scales, prepared, aqlm_layer(codes, codebooks, scales) if use_aqlm else None))
            for batch in batches:
                x = torch.randn(batch, in_f)
                ref = F.linear(x, dequantize(*layers[0][:3]))
                with torch.no_grad():
                    err_r = rel_err(cpu_matmul(x, layers[0][3]), ref)
                    err_a = rel_err(layers[0][4](x), ref) if use_aqlm else float("nan")  # also compiles numba
                contenders = {
                    "dense": [lambda w=w: F.linear(x, w) for w in dense_w],
                    "riverone": [lambda p=lay[3]: cpu_matmul(x, p) for lay in layers],
                }
                if use_aqlm:
                    contenders["aqlm"] = [lambda q=lay[4]: q(x) for lay in layers]
                with torch.no_grad():
                    time_passes(contenders, 1, float("inf"), 0.0)  # warm-up
                    t, clean, ran, other = time_passes(contenders, repeats, args.max_other, args.max_seconds)
                if torch.get_num_threads() != args.threads:
                    sys.exit(f"torch runs {torch.get_num_threads()} threads, not {args.threads}: timings invalid")
                kernel = layers[0][3].kernel_for(batch)
                ta = t.get("aqlm", float("nan"))
                row = (
                    f"| {in_f}->{out_f} | {num_codebooks}x{nbits} | {batch} | {t['dense']:.2f} | "
                    f"{t['riverone']:.2f} ({kernel}) | {ta:.2f} | {t['dense'] / t['riverone']:.2f}x | "
                    f"{t['dense'] / ta:.2f}x | {ta / t['riverone']:.2f}x | {err_r:.1e} / {err_a:.1e} | {clean}/{repeats} ({ran}), {other:.2f} |"
                )
                rows.append(row)
                print(row, flush=True)
            del layers
        del dense_w
    footer = (
        f"load average at end: {os.getloadavg()[0]:.2f}. A repeat (one pass of each contender) is clean when other "
        f"processes and hypervisor steal took < {args.max_other} CPUs during it; 'clean repeats (run)' = clean ones "
        "among those used (repeats run); 'other CPUs' = median CPUs taken by others in the repeats used."
    )
    print(footer)
    if args.output:
        args.output.write_text("\n".join([*header, "", columns, "|" + "---|" * (columns.count("|") - 1), *rows, "", footer]) + "\n")


if __name__ == "__main__":
    main()
