"""AqlmLinear: aqlm-compatible parameters, forward equal to the dequantized matmul, gradients."""

import aqlm
import pytest
import torch
import torch.nn.functional as F

from riverone_hf.modeling import AqlmLinear
from riverone_hf.aq.layout import QuantizedWeight, pack_codes

SCHEMES = [(1, 8, 1, 8), (2, 8, 1, 8), (1, 16, 1, 8), (2, 4, 2, 4)]
IDS = ["1x8g8", "2x8g8", "1x16g8", "2x4-og2g4"]


def random_quantized(num_codebooks, nbits, out_group, in_group, out_features=32, in_features=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**nbits, (out_features // out_group, in_features // in_group, num_codebooks), generator=gen)
    codebooks = torch.randn(num_codebooks, 2**nbits, out_group, in_group, generator=gen)
    scales = torch.rand(out_features // out_group, 1, 1, 1, generator=gen) + 0.5
    return QuantizedWeight(pack_codes(codes, nbits), codebooks, scales)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_parameters_match_aqlm_quantized_linear(scheme):
    num_codebooks, nbits, out_group, in_group = scheme
    kwargs = dict(in_group_size=in_group, out_group_size=out_group, num_codebooks=num_codebooks, nbits_per_codebook=nbits)
    ours = AqlmLinear(64, 32, bias=True, **kwargs)
    theirs = aqlm.QuantizedLinear(64, 32, bias=True, **kwargs)
    ours_params = {n: (p.shape, p.dtype, p.requires_grad) for n, p in ours.named_parameters()}
    theirs_params = {n: (p.shape, p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert ours_params == theirs_params


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 5, 16])
@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_forward_equals_dequantized_matmul(scheme, batch, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        quantized = random_quantized(*scheme)
        bias = torch.randn(32)
        layer = AqlmLinear.from_quantized(quantized, bias=bias)
        stored_codes = layer.codes.clone()
        x = torch.randn(batch, 3, 64)
        expected = F.linear(x, quantized.dequantize(), bias)
        for _ in range(2):  # the second call must not see state mutated by the first
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(layer.codes, stored_codes)
    finally:
        torch.set_num_threads(previous)


def test_dequantize_is_differentiable_in_codebooks_and_scales():
    layer = AqlmLinear.from_quantized(random_quantized(2, 8, 1, 8), bias=None)
    layer.codebooks.requires_grad_(True)
    layer.scales.requires_grad_(True)
    layer(torch.randn(4, 64)).square().sum().backward()
    assert layer.codebooks.grad is not None and layer.codebooks.grad.abs().sum() > 0
    assert layer.scales.grad is not None and layer.scales.grad.abs().sum() > 0


def test_from_quantized_casts_dtype_and_keeps_codes():
    quantized = random_quantized(2, 8, 1, 8)
    layer = AqlmLinear.from_quantized(quantized, bias=None, dtype=torch.bfloat16)
    assert layer.codebooks.dtype == torch.bfloat16 and layer.scales.dtype == torch.bfloat16
    assert layer.codes.dtype == torch.int8 and torch.equal(layer.codes, quantized.codes)


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="in_group_size"):
        AqlmLinear(60, 32, in_group_size=8, out_group_size=1, num_codebooks=1, nbits_per_codebook=8)


def test_cpu_kernel_follows_parameter_updates():
    layer = AqlmLinear.from_quantized(random_quantized(2, 8, 1, 8), bias=None)
    x = torch.randn(1, 64)
    layer(x)  # prepares the CPU kernel
    with torch.no_grad():
        layer.codebooks.mul_(2.0)  # in place, as an optimizer step would
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()), rtol=1e-5, atol=1e-5)
    layer.scales = torch.nn.Parameter(layer.scales.detach() * 3.0, requires_grad=False)  # replaced
    torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize()), rtol=1e-5, atol=1e-5)
    layer.cache_dense_weight = True
    x16 = torch.randn(64, 64)
    torch.testing.assert_close(layer(x16), F.linear(x16, layer.dequantize()), rtol=1e-4, atol=1e-4)
