"""The aqlm layout helpers: code packing, diagonal blocks of XᵀX and the code operator (small tensors, CPU)."""

import pytest
import torch

from riverone_hf.aq.layout import CodeOperator, dequantize, diagonal_blocks, pack_codes, unpack_codes


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("nbits", [1, 8, 12, 16], ids=["B1-int8", "B8-int8", "B12-int16", "B16-int16"])
def test_pack_unpack_round_trip(nbits):
    codes = torch.randint(2**nbits, (5, 7, 3), generator=_gen(0))
    codes[0, 0] = torch.tensor([0, 2**nbits - 1, 2 ** (nbits - 1)])  # both ends and the sign boundary
    packed = pack_codes(codes, nbits)
    assert packed.dtype == (torch.int8 if nbits <= 8 else torch.int16)
    assert torch.equal(unpack_codes(packed, nbits), codes)


@pytest.mark.parametrize("in_group_size", [1, 4, 8], ids=["g1", "g4", "g8"])
def test_diagonal_blocks_match_slices(in_group_size):
    xtx = torch.randn(32, 32, generator=_gen(1))
    blocks = diagonal_blocks(xtx, in_group_size)
    expected = torch.stack(
        [xtx[lo : lo + in_group_size, lo : lo + in_group_size] for lo in range(0, 32, in_group_size)]
    )
    assert blocks.is_contiguous() and torch.equal(blocks, expected)


@pytest.mark.parametrize(
    "num_codebooks, out_group_size, in_group_size",
    [(2, 1, 8), (3, 2, 4)],
    ids=["2-codebooks-og1-g8", "3-codebooks-og2-g4"],
)
def test_code_operator_apply_is_dequantize_and_adjoint_is_its_transpose(num_codebooks, out_group_size, in_group_size):
    """apply() is `dequantize`, and <A(C) s, M> = <C, adjoint(M, s)> for random C, s and M."""
    g = _gen(2)
    codebook_size, num_out_groups, num_in_groups = 16, 6, 5
    codes = torch.randint(codebook_size, (num_out_groups, num_in_groups, num_codebooks), generator=g)
    codebooks = torch.randn(num_codebooks, codebook_size, out_group_size, in_group_size, generator=g).double()
    scales = torch.rand(num_out_groups, generator=g).double() + 0.5
    operator = CodeOperator(codes, codebook_size, out_group_size, in_group_size)
    flat = codebooks.reshape(num_codebooks * codebook_size, -1)
    weight = operator.apply(flat, scales)
    assert weight.shape == (num_out_groups * out_group_size, num_in_groups * in_group_size)
    assert torch.equal(weight, dequantize(codes, codebooks, scales.view(-1, 1, 1, 1)))
    assert torch.equal(operator.to_weight(operator.to_groups(weight), None), weight)
    matrix = torch.randn(*weight.shape, generator=g).double()
    lhs = (weight * matrix).sum()
    rhs = (flat * operator.adjoint(matrix, scales)).sum()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)
