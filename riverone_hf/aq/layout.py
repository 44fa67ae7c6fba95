"""The `aqlm` package's tensor layout, and the pure-torch math on it.

Shapes (as `aqlm.QuantizedLinear` stores them):
  codes     [num_out_groups, num_in_groups, num_codebooks]     int8 (B <= 8) / int16 (B <= 16), signed:
            a code value v >= 2^(B-1) is stored as v - 2^B
  codebooks [num_codebooks, 2^B, out_group_size, in_group_size] float
  scales    [num_out_groups, 1, 1, 1]                            float
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


def code_dtype(nbits_per_codebook: int) -> torch.dtype:
    """Integer dtype the aqlm layout stores B-bit codes in."""
    if not 1 <= nbits_per_codebook <= 16:
        raise ValueError(f"`nbits_per_codebook` must be in [1, 16], got {nbits_per_codebook}")
    return torch.int8 if nbits_per_codebook <= 8 else torch.int16


def pack_codes(codes: torch.Tensor, nbits_per_codebook: int) -> torch.Tensor:
    """Unsigned code values in [0, 2^B) -> the signed storage dtype (without touching the input)."""
    codes = codes.to(torch.int64)
    signed = torch.where(codes >= 2 ** (nbits_per_codebook - 1), codes - 2**nbits_per_codebook, codes)
    return signed.to(code_dtype(nbits_per_codebook))


def unpack_codes(codes: torch.Tensor, nbits_per_codebook: int) -> torch.Tensor:
    """Stored signed codes -> int64 values in [0, 2^B)."""
    return codes.to(torch.int64) % (2**nbits_per_codebook)


def diagonal_blocks(xtx: torch.Tensor, in_group_size: int) -> torch.Tensor:
    """The diagonal blocks H_ii of an [in, in] matrix, one per input group, as a contiguous copy.

    They are what couples the weights inside one input group (beam-search Gram terms, the CG preconditioner).

    Args:
        xtx: [in_features, in_features] with in_features divisible by `in_group_size`.

    Returns:
        [num_in_groups, in_group_size, in_group_size].
    """
    num_in_groups = xtx.shape[0] // in_group_size
    blocks = xtx.reshape(num_in_groups, in_group_size, num_in_groups, in_group_size).diagonal(dim1=0, dim2=2)
    return blocks.permute(2, 0, 1).contiguous()  # diagonal() puts the group index last


class CodeOperator:
    """The linear map from codebooks to the weight for fixed codes, Ŵ = s ⊙ A(C), and its adjoint.

    The one place that turns codes and codebooks into a weight: `dequantize` applies it, and the engine's
    codebook updates (conjugate gradient and Adam) apply it and its adjoint for their gradients.

    Shapes: codes [O, I, M] int64 in [0, K); flat codebooks [M*K, go*gi]; scales [O]; weights [out, in]
    with out = O*go, in = I*gi; "groups" [O, I, go*gi] (one row per weight group, in code order).
    """

    def __init__(self, codes: torch.Tensor, codebook_size: int, out_group_size: int, in_group_size: int):
        """codes: [O, I, M] int64 unpacked codes in [0, codebook_size); the group sizes give the weight shape."""
        self.num_out_groups, self.num_in_groups, self.num_codebooks = codes.shape
        self.codebook_size = codebook_size
        self.out_group_size, self.in_group_size = out_group_size, in_group_size
        offsets = torch.arange(self.num_codebooks, device=codes.device) * codebook_size
        self.index = (codes + offsets).reshape(-1, self.num_codebooks)  # [O*I, M] rows of the flat codebooks

    @cached_property
    def per_codebook(self) -> torch.Tensor:
        """[M, O*I]: for codebook m, the flat-codebook row each weight group uses (built on first use)."""
        return self.index.T.contiguous()

    def codewords(self, flat_codebooks: torch.Tensor) -> torch.Tensor:
        """[M*K, go*gi] -> [O, I, go*gi]: the unscaled sum of each weight group's M codewords."""
        groups = F.embedding_bag(self.index, flat_codebooks, mode="sum")  # [O*I, go*gi]
        return groups.view(self.num_out_groups, self.num_in_groups, -1)

    def to_weight(self, groups: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """[O, I, go*gi] groups, times scales [O] (or None: unscaled) -> the [out, in] weight."""
        groups = groups.view(self.num_out_groups, self.num_in_groups, self.out_group_size, self.in_group_size)
        if scales is not None:
            groups = groups * scales.reshape(-1, 1, 1, 1)
        return groups.transpose(1, 2).reshape(
            self.num_out_groups * self.out_group_size, self.num_in_groups * self.in_group_size
        )

    def to_groups(self, matrix: torch.Tensor) -> torch.Tensor:
        """[out, in] -> [O, I, go*gi], the inverse reshuffle of `to_weight` (unscaled)."""
        groups = matrix.view(self.num_out_groups, self.out_group_size, self.num_in_groups, self.in_group_size)
        return groups.transpose(1, 2).reshape(self.num_out_groups, self.num_in_groups, -1)

    def apply(self, flat_codebooks: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """Ŵ = s ⊙ A(C): [M*K, go*gi] codebooks, scales [O] or None (unscaled) -> [out, in]."""
        return self.to_weight(self.codewords(flat_codebooks), scales)

    def sum_per_codeword(self, values: torch.Tensor) -> torch.Tensor:
        """[O*I, d] one row per weight group -> [M*K, d]: per codeword, the sum over the groups that use it."""
        out = torch.zeros(self.num_codebooks * self.codebook_size, values.shape[1], dtype=values.dtype,
                          device=values.device)
        for m in range(self.num_codebooks):
            out.index_add_(0, self.per_codebook[m], values)
        return out

    def adjoint(self, matrix: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Aᵀ(s ⊙ ·): [out, in] -> [M*K, go*gi], per codeword Σ over the groups using it of s_o · that group."""
        groups = self.to_groups(matrix) * scales.view(-1, 1, 1)  # [O, I, go*gi]
        return self.sum_per_codeword(groups.view(self.index.shape[0], -1))


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rebuild the [out_features, in_features] weight; differentiable in `codebooks` and `scales`.

    Args:
        codes: [num_out_groups, num_in_groups, num_codebooks], stored (signed) or unpacked codes.
        codebooks: [num_codebooks, codebook_size, out_group_size, in_group_size].
        scales: [num_out_groups, 1, 1, 1].
    """
    num_codebooks, codebook_size, out_group_size, in_group_size = codebooks.shape
    nbits = codebook_size.bit_length() - 1
    operator = CodeOperator(unpack_codes(codes, nbits), codebook_size, out_group_size, in_group_size)
    return operator.apply(codebooks.reshape(num_codebooks * codebook_size, -1), scales)


@dataclass
class QuantizedWeight:
    """Result of quantizing one weight matrix, in the aqlm layout (see module docstring)."""

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor

    @property
    def nbits_per_codebook(self) -> int:
        """B, the bits of one code (log2 of the codebook size)."""
        return self.codebooks.shape[1].bit_length() - 1

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight this encodes."""
        num_out_groups, num_in_groups, _ = self.codes.shape
        _, _, out_group_size, in_group_size = self.codebooks.shape
        return num_out_groups * out_group_size, num_in_groups * in_group_size

    def dequantize(self) -> torch.Tensor:
        """The [out_features, in_features] weight the codes, codebooks and scales encode."""
        return dequantize(self.codes, self.codebooks, self.scales)

    def storage_bits(self) -> dict[str, int]:
        """Bits each part takes as stored: codes at B bits each, codebooks and scales at their dtype's size."""
        return {
            "codes": self.codes.numel() * self.nbits_per_codebook,
            "codebooks": self.codebooks.numel() * self.codebooks.element_size() * 8,
            "scales": self.scales.numel() * self.scales.element_size() * 8,
        }
