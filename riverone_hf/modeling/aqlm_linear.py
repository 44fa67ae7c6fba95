"""`AqlmLinear`: an additively quantized Linear with exactly `aqlm.QuantizedLinear`'s parameters.

Parameters (names, shapes and dtypes as `aqlm.QuantizedLinear`, so checkpoints are interchangeable):
  codes     [num_out_groups, num_in_groups, num_codebooks]  int8 / int16 (signed storage)
  codebooks [num_codebooks, 2^B, out_group_size, in_group_size]
  scales    [num_out_groups, 1, 1, 1]
  bias      [out_features] or None

Forward paths, chosen per call:
  - gradients wanted for codebooks/scales (PV-Tuning), or no kernel fits: the differentiable
    `dequantize()` + `F.linear`;
  - CUDA: the `aqlm` package's CUDA/Triton kernels (its kernel selector);
  - CPU: riverone's own kernels (`kernels/cpu.py`: lookup tables for 8-bit codebooks at decode,
    register-rebuilt groups, blocked GEMM, or dequantize + MKL for long inputs), prepared once per
    module; the stored codes are never permuted in place (the `aqlm` package's CPU kernel does that,
    and races with more than one numba thread). Set `cache_dense_weight = True` on a module to keep its
    dequantized fp32 weight for long inputs (4 bytes per weight: trades memory for prefill speed).

The prepared CPU kernel is keyed on `tensor_key` of the live parameters, so tracked in-place updates
(under `torch.no_grad()`, `copy_`, `load_state_dict`, optimizer steps), `param.data = new`, replaced
Parameters and `.to()` make the next forward prepare a new one (swapped in, never modified: another
thread may be using the old one). Writes through `param.data.<op>_()` bump no version counter: for the
codebooks and scales `cpu_matmul` compares their content where its kernel reads a derived copy (and
this module then prepares again); for the codes they go unnoticed by the lookup-table kernel and the
cached dense weight (see `kernels/cpu.py`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..aq.layout import QuantizedWeight, code_dtype, dequantize
from ..kernels.cpu import PreparedCpuKernel, StaleKernelError, cpu_matmul, prepare_cpu_kernel
from ..kernels.tensor_key import tensor_key

# The aqlm package switches from its matrix-vector to its matrix-matrix kernels above this many rows.
_AQLM_GEMV_MAX_ROWS = 6


class AqlmLinear(nn.Module):
    """A Linear whose weight is sum-of-codebook-vectors times a per-output-group scale (AQLM)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_group_size: int,
        out_group_size: int,
        num_codebooks: int,
        nbits_per_codebook: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if in_features % in_group_size or out_features % out_group_size:
            raise ValueError(
                f"AqlmLinear needs in_features ({in_features}) divisible by in_group_size ({in_group_size}) "
                f"and out_features ({out_features}) divisible by out_group_size ({out_group_size})"
            )
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.in_group_size, self.out_group_size = in_group_size, out_group_size
        self.num_codebooks, self.nbits_per_codebook = num_codebooks, nbits_per_codebook
        self.codebook_size = 2**nbits_per_codebook
        num_out_groups, num_in_groups = out_features // out_group_size, in_features // in_group_size
        self.codebooks = nn.Parameter(
            torch.empty(num_codebooks, self.codebook_size, out_group_size, in_group_size, **factory),
            requires_grad=False,
        )
        self.codes = nn.Parameter(
            torch.empty(num_out_groups, num_in_groups, num_codebooks, device=device, dtype=code_dtype(nbits_per_codebook)),
            requires_grad=False,
        )
        self.scales = nn.Parameter(torch.empty(num_out_groups, 1, 1, 1, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.cache_dense_weight = False
        self._cpu_prepared: PreparedCpuKernel | None = None  # for the live parameters, see `_cpu_kernel`

    @classmethod
    def from_quantized(cls, quantized: QuantizedWeight, bias: torch.Tensor | None = None, dtype=None) -> AqlmLinear:
        """Wrap an engine result (and an optional bias) as a module; codebooks/scales cast to `dtype`."""
        out_features, in_features = quantized.shape
        num_codebooks, _, out_group_size, in_group_size = quantized.codebooks.shape
        dtype = dtype or quantized.codebooks.dtype
        module = cls(
            in_features,
            out_features,
            in_group_size=in_group_size,
            out_group_size=out_group_size,
            num_codebooks=num_codebooks,
            nbits_per_codebook=quantized.nbits_per_codebook,
            bias=bias is not None,
            device=quantized.codes.device,
            dtype=dtype,
        )
        with torch.no_grad():
            module.codes.copy_(quantized.codes)
            module.codebooks.copy_(quantized.codebooks)
            module.scales.copy_(quantized.scales)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def dequantize(self) -> torch.Tensor:
        """The [out_features, in_features] weight; differentiable in codebooks and scales."""
        return dequantize(self.codes, self.codebooks, self.scales)

    def _wants_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.codebooks.requires_grad or self.scales.requires_grad)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self._wants_grad():
            if input.is_cuda:
                return self._aqlm_cuda_forward(input)
            if input.device.type == "cpu":
                out = self._cpu_forward(input)
                if out is not None:
                    return out
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return F.linear(input, self.dequantize().to(input.dtype), bias)

    def _cpu_forward(self, input: torch.Tensor) -> torch.Tensor | None:
        """riverone's CPU kernels on the live parameters, or None when no kernel runs here."""
        prepared = self._cpu_kernel()
        if prepared is None:
            return None
        try:
            return cpu_matmul(input, prepared, self.bias)
        except StaleKernelError:  # codebooks/scales written through `.data`: no version counter saw it
            self._cpu_prepared = None
            return self._cpu_forward(input)  # a freshly prepared kernel is current

    def _cpu_kernel(self) -> PreparedCpuKernel | None:
        """The prepared CPU kernel, prepared anew when the live parameters' `tensor_key` or
        `cache_dense_weight` changed (None when no kernel runs here)."""
        sources = (self.codes, self.codebooks, self.scales)
        prepared = self._cpu_prepared
        if (
            prepared is None
            or prepared.key != tensor_key(*sources)
            or prepared.cache_dense_weight != self.cache_dense_weight
        ):
            prepared = prepare_cpu_kernel(*sources, cache_dense_weight=self.cache_dense_weight)
            self._cpu_prepared = prepared
        return prepared

    def _aqlm_cuda_forward(self, input: torch.Tensor) -> torch.Tensor:
        from aqlm.inference_kernels import get_forward_pass_kernel

        batch_rows = math.prod(input.shape[:-1])
        kernel = get_forward_pass_kernel(self.codebooks, batch_rows > _AQLM_GEMV_MAX_ROWS)
        return kernel(input, self.codes, self.codebooks, self.scales, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.num_codebooks}x{self.nbits_per_codebook}, "
            f"groups={self.out_group_size}x{self.in_group_size}, bias={self.bias is not None}"
        )
