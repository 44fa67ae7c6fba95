"""Fast CPU inference kernels for AQLM-quantized Linear layers (fp32 activations): preparation and dispatch.

API (used by `AqlmLinear`):
  prepared = prepare_cpu_kernel(codes, codebooks, scales)    # once; the caller caches it (None: no kernel)
  y = cpu_matmul(x, prepared, bias)                           # x [..., in_features] -> [..., out_features]

`prepare_cpu_kernel` never mutates its inputs: it keeps references to them, fp32 copies of the small
codebooks/scales where they are not fp32 already, and, for codebooks of <= 256 entries, ONE re-laid-out
copy of the codes (same size as the stored codes) for the lookup-table kernel.
`prepare_cpu_kernel(..., cache_dense_weight=True)` also keeps the dequantized fp32 weight
(4 bytes per weight: 8-16x the codes) and uses it for long prompts instead of rebuilding it per call.

A `PreparedCpuKernel` is immutable (other threads may be inside a kernel call reading its tensors), so
when its sources change the caller prepares a new one. `cpu_matmul` checks, on every call, that the
kernel it picked would compute with the current sources (`PreparedCpuKernel.is_current`) and raises
`StaleKernelError` (a ValueError: prepare again) when not:
  - `tensor_key` of the sources (data pointer, version counter, shape, strides, dtype, device) catches
    tracked in-place ops (under `torch.no_grad()`, `copy_`, `load_state_dict`, optimizer steps), `.to()`,
    and `param.data = new` when the parameters themselves were passed (a `.detach()`ed view keeps the
    old storage; `AqlmLinear` also compares the key of its live parameters);
  - writes through `param.data.<op>_()` bump no version counter, so whenever the chosen kernel reads a
    copy derived from the codebooks or the scales (the lookup tables, fp32 conversions, the cached
    dense weight), their content is compared with a snapshot taken when prepared. Kernels that read
    the source storage (fp32 codebooks and scales, fp16 16-bit codebooks for dd, 8/16-bit codes) need
    no check: they cannot go stale. Cost of the whole check at 2560->9728, batch 1 (medians of 300
    calls, 2 threads, on the 2-core machine of BENCHMARKS.md while it was shared): 2x8 lut 8-17 us
    (about 1% of the call or less); 1x16 dd 3-6 us with fp32 codebooks, 12-20 us with fp16 ones (the
    fp32 copy of fp16 scales). This is why fp32 16-bit codebooks are not copied to fp16 even when they
    hold fp16 values: checking the 2 MiB the copy comes from took 0.39-0.52 ms per call, more than
    reading fp16 saved (0.27-0.42 ms; 1 thread, 10 layers cycled, same machine);
  - the codes are too large to compare per call: writes to them through `.data` are NOT detected. The
    dd/gemm kernels see them when the codes are 8- or 16-bit (read in place); the lookup tables and the
    cached dense weight do not. Modify the codes with tracked ops, or prepare again.

Kernels (C++ in `aqlm_cpu.cpp`, built once per machine by `build.py`; threads are torch's intra-op
threads, so `torch.set_num_threads` applies; each thread owns its outputs or its own partial sums, so
results are the same for any thread count up to float rounding):

  lut   codebooks of <= 256 entries (1x8, 2x8, ...), out_group_size 1, few rows: per call, per block of
        16 (input group, codebook) pairs, a 16 KiB fp32 table x_group . codebook_entry (L1-resident,
        built with vectorised FMAs), then each output row sums 16 table lookups. Threads split the
        input groups (each keeps its own partial output vector; one reduction at the end), so the
        codes are streamed once, from a copy laid out [input block][output row][16].
  dd    out_group_size 1, in_group_size 8, 1/2/4 codebooks (any size), up to 6 rows: each weight
        group is rebuilt in registers (sum of codebook vectors) and used at once for all rows; 16-bit
        codebooks (2 MiB) are prefetched ahead from the codes, and read as fp16 when they are stored as
        fp16 (as published AQLM checkpoints are) to halve the cache misses.
  gemm  any layout, up to 32 rows: 4 output rows at a time are dequantized into an L2-resident
        buffer and multiplied with a 4x4 register-blocked kernel.
  dense more rows: the whole weight is dequantized (C++, in parallel) or taken from the opt-in cache,
        then `F.linear` (MKL/oneDNN) does the matmul, which is compute-bound at that size.

Measured (`python bench/kernels.py`, tables in BENCHMARKS.md: 2-core AMD EPYC, torch.set_num_threads(2),
decode passes cycling over 10 distinct layers so that weights are not cache-resident, medians of 7 repeats,
two runs), against dense fp32 `F.linear` at 2560<->9728: batch 1, 2x8 4.7-8.2x faster, 1x8 9.7-15.6x, 1x16
(dd) 2.5-3.3x (measured when dd read an fp16 copy of the fp32 codebooks, see above); batch 16, 1.4-2.9x
faster; against the aqlm package's numba kernel (1 numba thread, where it is correct) 2.9-5.5x faster at
batch 1 for 2x8/1x8.

Why these choices (single-thread CPU-time measurements on the same machine, 2560<->9728, batch 1):
  - building the lookup table with scalar loops cost 0.7-1.3 ms of the ~2 ms per call at 9728 inputs;
    built with vectorised FMAs, in L1-sized blocks, it costs 0.1 ms;
  - AVX2/AVX-512 gathers (16 rows at a time) were 30-60% slower than scalar lookups on Zen 4;
  - streaming the stored layout (row stride = all input groups) instead of the blocked copy re-reads
    each cache line of codes from memory once per block: 1.3-2x slower;
  - rebuilding weights in registers (dd) beats tables from 2-3 rows (2x8) or 5-7 rows (1x8) on,
    because the rebuilt group is reused by every row while a table serves one row;
  - writing dequantized tiles (gemm) costs ~2.5 cycles per weight group, so it only wins once the
    multiply-adds dominate (>= ~7 rows).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..aq.layout import dequantize
from .build import ENV_DISABLE, ENV_KERNEL_DIR, cpu_kernels_available, cpu_kernels_build_error, library
from .tensor_key import tensor_key

__all__ = [
    "ENV_DISABLE",
    "ENV_KERNEL_DIR",
    "PreparedCpuKernel",
    "StaleKernelError",
    "cpu_kernels_available",
    "cpu_kernels_build_error",
    "cpu_matmul",
    "prepare_cpu_kernel",
]

_LUT_TABLE = 256  # entries per lookup table (smaller codebooks are zero-padded)
_LUT_TABLES_PER_BLOCK = 16  # input groups x codebooks per lookup block (16 KiB of fp32)

# Batch-size dispatch (rows = prod(input.shape[:-1])), from measurements (module docstring).
LUT_MAX_ROWS_TIMES_CODEBOOKS = 4  # lut while rows * num_codebooks <= 4 (1x8: <= 4 rows, 2x8: <= 2 rows)
DD_MAX_ROWS = 6
GEMM_MAX_ROWS = 32

KERNELS = ("lut", "dd", "gemm", "dense")
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class StaleKernelError(ValueError):
    """The tensors a `PreparedCpuKernel` was made from changed since; call `prepare_cpu_kernel` again."""


class Sources(NamedTuple):
    """The tensors a `PreparedCpuKernel` was made from (as passed: parameters or views)."""

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"riverone_hf CPU kernel {what} failed (status {status})")


def _aliases(derived: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether `derived` is the source's own storage (a view), not a copy that can go stale."""
    return derived.data_ptr() == source.data_ptr()


def _unchanged(source: torch.Tensor, snapshot: torch.Tensor) -> bool:
    """Whether `source` holds the same bits as its `snapshot` (compared as integers: NaN-safe)."""
    as_int = _INT_OF_SIZE[source.element_size()]
    return torch.equal(source.detach().view(as_int), snapshot.view(as_int))


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedCpuKernel:
    """What `cpu_matmul` needs for one AQLM weight, derived once from (codes, codebooks, scales).

    Immutable. Holds references to the source tensors (never writes them) and what it needs to tell
    whether they changed (`is_current`). Row thresholds (`lut_max_rows`, `dd_max_rows`, `gemm_max_rows`)
    pick the kernel per call.
    """

    in_features: int
    out_features: int
    num_codebooks: int
    nbits_per_codebook: int
    out_group_size: int
    in_group_size: int
    lut_max_rows: int
    dd_max_rows: int
    gemm_max_rows: int
    cache_dense_weight: bool
    codes: torch.Tensor = dataclasses.field(repr=False)  # stored layout, unsigned view/copy
    codebooks: torch.Tensor = dataclasses.field(repr=False)  # fp32 [K, 2^B, OG, G]
    codebooks_half: torch.Tensor | None = dataclasses.field(repr=False)  # the stored fp16 16-bit codebooks
    scales: torch.Tensor = dataclasses.field(repr=False)  # fp32 [num_out_groups]
    lut_codes: torch.Tensor | None = dataclasses.field(repr=False)  # [nblk, out_features, J*K] uint8
    lut_codebooks: torch.Tensor | None = dataclasses.field(repr=False)  # fp32 [K, G, 256]
    lut_groups_per_block: int
    dense_weight: torch.Tensor | None = dataclasses.field(repr=False)
    sources: Sources = dataclasses.field(repr=False)
    key: tuple = dataclasses.field(repr=False)  # tensor_key(*sources) when prepared
    # kernel -> the sources ("codebooks", "scales") it reads a derived copy of; their content when prepared
    content_checks: dict[str, tuple[str, ...]] = dataclasses.field(repr=False)
    snapshots: dict[str, torch.Tensor] = dataclasses.field(repr=False)

    @property
    def scheme(self) -> str:
        return f"{self.num_codebooks}x{self.nbits_per_codebook}"

    def kernel_for(self, rows: int) -> str:
        """Which kernel `cpu_matmul` uses for an input with `rows` rows: lut, dd, gemm or dense."""
        if self.lut_codes is not None and rows <= self.lut_max_rows:
            return "lut"
        if self._dd_ok and rows <= self.dd_max_rows:
            return "dd"
        if rows <= self.gemm_max_rows:
            return "gemm"
        return "dense"

    @property
    def _dd_ok(self) -> bool:
        return self.out_group_size == 1 and self.in_group_size == 8 and self.num_codebooks in (1, 2, 4)

    def extra_bytes(self) -> int:
        """Memory this object holds beyond the source tensors (copies, tables, content snapshots)."""
        held = [self.codes, self.codebooks, self.codebooks_half, self.scales, self.lut_codes, self.lut_codebooks,
                self.dense_weight, *self.snapshots.values()]
        sources = {t.data_ptr() for t in self.sources}
        own = {t.data_ptr(): t for t in held if t is not None and t.data_ptr() not in sources}
        return sum(t.numel() * t.element_size() for t in own.values())

    def is_current(self, kernel: str | None = None) -> bool:
        """Whether `kernel` (default: every kernel) would compute with what the sources hold now.

        False when their `tensor_key` changed, or when the content of codebooks/scales that the kernel
        reads a derived copy of differs from what that copy was made from (see the module docstring).
        """
        if tensor_key(*self.sources) != self.key:
            return False
        checked = self.content_checks[kernel] if kernel else set().union(*self.content_checks.values())
        return all(_unchanged(getattr(self.sources, name), self.snapshots[name]) for name in checked)


def _build_prepared(
    codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, *, cache_dense_weight: bool
) -> PreparedCpuKernel:
    sources = Sources(codes, codebooks, scales)
    key = tensor_key(*sources)
    num_out_groups, num_in_groups, num_codebooks = codes.shape
    _, codebook_size, out_group_size, in_group_size = codebooks.shape
    nbits = codebook_size.bit_length() - 1
    with torch.no_grad():
        # codes as unsigned integers of the stored width: a free view for B = 8 / 16, else a copy
        unsigned = torch.uint8 if codebook_size <= 256 else torch.uint16
        stored = torch.int8 if unsigned == torch.uint8 else torch.int16
        if codebook_size in (256, 65536) and codes.dtype == stored and codes.is_contiguous():
            ucodes = codes.detach().view(unsigned)  # two's complement: the stored signed value IS the code
        else:
            ucodes = (codes.detach().to(torch.int32) % codebook_size).to(unsigned).contiguous()
        cb32 = codebooks.detach().to(torch.float32).contiguous()
        # 16-bit codebooks stored as fp16 are read as they are by dd: half the cache misses, nothing to go stale
        fp16_stored = codebooks.dtype == torch.float16 and codebooks.is_contiguous()
        cb_half = codebooks.detach() if codebook_size > 256 and fp16_stored else None
        sc32 = scales.detach().to(torch.float32).reshape(num_out_groups).contiguous()
        lut_codes = lut_cb = None
        groups_per_block = 0
        if codebook_size <= _LUT_TABLE and out_group_size == 1:
            groups_per_block = max(1, _LUT_TABLES_PER_BLOCK // num_codebooks)
            nblk = -(-num_in_groups // groups_per_block)
            pad = nblk * groups_per_block - num_in_groups
            c8 = ucodes if ucodes.dtype == torch.uint8 else ucodes.to(torch.uint8)
            if pad:
                c8 = torch.cat([c8, c8.new_zeros(num_out_groups, pad, num_codebooks)], dim=1)
            lut_codes = (
                c8.reshape(num_out_groups, nblk, groups_per_block * num_codebooks).transpose(0, 1).contiguous()
            )
            lut_cb = torch.zeros(num_codebooks, in_group_size, _LUT_TABLE, dtype=torch.float32)
            lut_cb[:, :, :codebook_size] = cb32.reshape(num_codebooks, codebook_size, in_group_size).transpose(1, 2)

        # which kernels read a copy derived from the codebooks / the scales (those can go stale)
        cb_copied, sc_copied = not _aliases(cb32, codebooks), not _aliases(sc32, scales)
        copied = {
            "lut": (True, sc_copied),
            "dd": (cb_copied and cb_half is None, sc_copied),
            "gemm": (cb_copied, sc_copied),
            "dense": (True, True) if cache_dense_weight else (cb_copied, sc_copied),
        }
        content_checks = {
            kernel: tuple(name for name, c in zip(("codebooks", "scales"), flags) if c)
            for kernel, flags in copied.items()
        }
        checked = set().union(*content_checks.values())
        snapshots = {name: getattr(sources, name).detach().clone() for name in checked}

        prepared = PreparedCpuKernel(
            in_features=num_in_groups * in_group_size,
            out_features=num_out_groups * out_group_size,
            num_codebooks=num_codebooks,
            nbits_per_codebook=nbits,
            out_group_size=out_group_size,
            in_group_size=in_group_size,
            lut_max_rows=max(1, LUT_MAX_ROWS_TIMES_CODEBOOKS // num_codebooks),
            dd_max_rows=DD_MAX_ROWS,
            gemm_max_rows=GEMM_MAX_ROWS,
            cache_dense_weight=cache_dense_weight,
            codes=ucodes,
            codebooks=cb32,
            codebooks_half=cb_half,
            scales=sc32,
            lut_codes=lut_codes,
            lut_codebooks=lut_cb,
            lut_groups_per_block=groups_per_block,
            dense_weight=None,
            sources=sources,
            key=key,
            content_checks=content_checks,
            snapshots=snapshots,
        )
        if cache_dense_weight:
            prepared = dataclasses.replace(prepared, dense_weight=_dequantize_fp32(prepared))
    return prepared


def prepare_cpu_kernel(
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    *,
    cache_dense_weight: bool = False,
) -> PreparedCpuKernel | None:
    """Prepare the CPU kernels for one AQLM weight (aqlm layout), once; the caller caches the result.

    Returns None when the kernels cannot run here (tensors not on CPU, kernels disabled or not
    buildable -- the latter with a loud warning), so the caller falls back to dequantize + matmul.
    Never mutates its inputs. Pass parameters themselves (not `.detach()`ed views) for `param.data = new`
    to be noticed. `cache_dense_weight=True` also keeps the fp32 dequantized weight
    (out_features x in_features x 4 bytes) for long inputs (> `gemm_max_rows` rows).
    """
    if codes.ndim != 3 or codebooks.ndim != 4 or codes.shape[2] != codebooks.shape[0]:
        raise ValueError(
            f"expected codes [out_groups, in_groups, K] and codebooks [K, 2^B, out_group, in_group], "
            f"got {tuple(codes.shape)} and {tuple(codebooks.shape)}"
        )
    if codes.shape[0] != scales.shape[0] or scales.numel() != codes.shape[0]:
        raise ValueError(f"expected scales [{codes.shape[0]}, 1, 1, 1], got {tuple(scales.shape)}")
    codebook_size = codebooks.shape[1]
    if codebook_size & (codebook_size - 1) or codebook_size > 2**16:
        return None
    if any(t.device.type != "cpu" for t in (codes, codebooks, scales)) or codes.is_floating_point():
        return None
    if not cpu_kernels_available():
        return None
    return _build_prepared(codes, codebooks, scales, cache_dense_weight=cache_dense_weight)


def _dequantize_fp32(p: PreparedCpuKernel) -> torch.Tensor:
    W = torch.empty(p.out_features, p.in_features, dtype=torch.float32)
    _check(
        library().rv_dequant(
            _ptr(p.codes), p.codes.element_size(), p.out_features, p.in_features // p.in_group_size,
            p.num_codebooks, p.in_group_size, p.out_group_size, p.codebooks.shape[1], _ptr(p.codebooks),
            _ptr(p.scales), _ptr(W),
        ),
        "dequantize",
    )
    return W


def cpu_matmul(
    input: torch.Tensor,
    prepared: PreparedCpuKernel,
    bias: torch.Tensor | None = None,
    *,
    kernel: str | None = None,
) -> torch.Tensor:
    """`F.linear(input, W, bias)` for the AQLM weight W that `prepared` was made from.

    `input` [..., in_features] on CPU (computed in fp32; the result has input's dtype). The kernel is
    chosen by the number of rows (`prepared.kernel_for`); `kernel=` forces one (lut/dd/gemm/dense).
    Raises `StaleKernelError` when that kernel would not compute with what the sources hold now
    (`prepared.is_current(kernel)`): prepare again; `prepared` itself is never modified.
    Inference only: when autograd needs a graph through input or bias, this uses the differentiable
    dequantize + `F.linear` of the sources instead.
    """
    if input.shape[-1] != prepared.in_features:
        raise ValueError(f"expected input [..., {prepared.in_features}], got {tuple(input.shape)}")
    if torch.is_grad_enabled() and (input.requires_grad or (bias is not None and bias.requires_grad)):
        weight = dequantize(*prepared.sources).to(input.dtype)
        return F.linear(input, weight, bias)

    lead = input.shape[:-1]
    rows = math.prod(lead)
    out_dtype = input.dtype
    x = input.reshape(rows, prepared.in_features)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    x = x.contiguous()
    b = None
    if bias is not None:
        b = bias.detach()
        if b.dtype != torch.float32:
            b = b.to(torch.float32)
        b = b.contiguous()
    if rows == 0:
        return input.new_empty(*lead, prepared.out_features)

    which = kernel or prepared.kernel_for(rows)
    if which not in KERNELS:
        raise ValueError(f"unknown kernel {which!r}; expected lut, dd, gemm or dense")
    if which == "lut" and prepared.lut_codes is None:
        raise ValueError(f"no lookup-table kernel for {prepared.scheme} with out_group_size {prepared.out_group_size}")
    if which == "dd" and not prepared._dd_ok:
        raise ValueError("the dd kernel needs out_group_size 1, in_group_size 8 and 1, 2 or 4 codebooks")
    if not prepared.is_current(which):
        raise StaleKernelError(
            f"the codes/codebooks/scales of this {prepared.scheme} PreparedCpuKernel changed since it was "
            "prepared; call prepare_cpu_kernel again"
        )

    if which == "dense":
        weight = prepared.dense_weight if prepared.dense_weight is not None else _dequantize_fp32(prepared)
        out = F.linear(x, weight, b)
    else:
        lib = library()
        out = torch.empty(rows, prepared.out_features, dtype=torch.float32)
        ng = prepared.in_features // prepared.in_group_size
        if which == "lut":
            status = lib.rv_lut(
                _ptr(x), rows, ng, prepared.in_group_size, _ptr(prepared.lut_codes), prepared.lut_codes.shape[0],
                prepared.lut_groups_per_block, prepared.num_codebooks, _ptr(prepared.lut_codebooks),
                _ptr(prepared.scales), _ptr(b), _ptr(out), prepared.out_features,
            )
        elif which == "dd":
            half = prepared.codebooks_half is not None
            status = lib.rv_dd(
                _ptr(x), rows, _ptr(prepared.codes), prepared.codes.element_size(), prepared.out_features, ng,
                prepared.num_codebooks, prepared.codebooks.shape[1],
                _ptr(prepared.codebooks_half if half else prepared.codebooks), int(half),
                _ptr(prepared.scales), _ptr(b), _ptr(out),
            )
        else:
            status = lib.rv_gemm(
                _ptr(x), rows, _ptr(prepared.codes), prepared.codes.element_size(), prepared.out_features, ng,
                prepared.num_codebooks, prepared.in_group_size, prepared.out_group_size,
                prepared.codebooks.shape[1], _ptr(prepared.codebooks), _ptr(prepared.scales), _ptr(b), _ptr(out),
            )
        _check(status, which)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out.reshape(*lead, prepared.out_features)
