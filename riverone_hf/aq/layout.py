"""The `aqlm` package's tensor layout, and the pure-torch math on it.

Shapes (as `aqlm.QuantizedLinear` stores them):
  codes     [num_out_groups, num_in_groups, num_codebooks]     int8 (B <= 8) / int16 (B <= 16), signed:
            a code value v >= 2^(B-1) is stored as v - 2^B
  codebooks [num_codebooks, 2^B, out_group_size, in_group_size] float
  scales    [num_out_groups, 1, 1, 1]                            float
"""

from __future__ import annotations

from dataclasses import dataclass

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


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rebuild the [out_features, in_features] weight; differentiable in `codebooks` and `scales`.

    Args:
        codes: [num_out_groups, num_in_groups, num_codebooks], stored (signed) or unpacked codes.
        codebooks: [num_codebooks, codebook_size, out_group_size, in_group_size].
        scales: [num_out_groups, 1, 1, 1].
    """
    num_out_groups, num_in_groups, num_codebooks = codes.shape
    _, codebook_size, out_group_size, in_group_size = codebooks.shape
    nbits = codebook_size.bit_length() - 1
    offsets = torch.arange(num_codebooks, device=codes.device) * codebook_size  # [num_codebooks]
    flat_codes = unpack_codes(codes, nbits).reshape(-1, num_codebooks) + offsets
    groups = F.embedding_bag(flat_codes, codebooks.reshape(num_codebooks * codebook_size, -1), mode="sum")
    groups = groups.view(num_out_groups, num_in_groups, out_group_size, in_group_size) * scales
    return groups.transpose(1, 2).reshape(num_out_groups * out_group_size, num_in_groups * in_group_size)


@dataclass
class QuantizedWeight:
    """Result of quantizing one weight matrix, in the aqlm layout (see module docstring)."""

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor

    @property
    def nbits_per_codebook(self) -> int:
        return self.codebooks.shape[1].bit_length() - 1

    @property
    def shape(self) -> tuple[int, int]:
        num_out_groups, num_in_groups, _ = self.codes.shape
        _, _, out_group_size, in_group_size = self.codebooks.shape
        return num_out_groups * out_group_size, num_in_groups * in_group_size

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.codebooks, self.scales)

    def storage_bits(self) -> dict[str, int]:
        """Bits each part takes as stored: codes at B bits each, codebooks and scales at their dtype's size."""
        return {
            "codes": self.codes.numel() * self.nbits_per_codebook,
            "codebooks": self.codebooks.numel() * self.codebooks.element_size() * 8,
            "scales": self.scales.numel() * self.scales.element_size() * 8,
        }

    def bits_per_weight(self) -> float:
        """Bits per weight including codebooks and scales."""
        out_features, in_features = self.shape
        return sum(self.storage_bits().values()) / (out_features * in_features)
