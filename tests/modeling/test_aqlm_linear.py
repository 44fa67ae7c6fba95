"""AqlmLinear: aqlm-compatible parameters, forward equal to the dequantized matmul, gradients."""

import pytest
import torch
import torch.nn.functional as F

from riverone_hf.kernels.cpu import cpu_kernels_available
from riverone_hf.modeling import AqlmLinear
from riverone_hf.aq.layout import QuantizedWeight, dequantize, pack_codes

SCHEMES = [(1, 8, 1, 8), (2, 8, 1, 8), (1, 16, 1, 8), (2, 4, 2, 4)]
IDS = ["1x8g8", "2x8g8", "1x16g8", "2x4-og2g4"]


def random_quantized(num_codebooks, nbits, out_group, in_group, out_features=32, in_features=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**nbits, (out_features // out_group, in_features // in_group, num_codebooks), generator=gen)
    codebooks = torch.randn(num_codebooks, 2**nbits, out_group, in_group, generator=gen)
    scales = torch.rand(out_features // out_group, 1, 1, 1, generator=gen) + 0.5
    return QuantizedWeight(pack_codes(codes, nbits), codebooks, scales)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
@pytest.mark.aqlm
def test_parameters_match_aqlm_quantized_linear(scheme):
    import aqlm

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


# After a first forward has prepared the CPU kernel, every kind of parameter update must reach the next
# no-grad forward. (layer, rows, the kernel that serves it): lut always reads copies of the codebooks; dd and
# gemm read fp32 codebooks/scales (and fp16 1x16 codebooks) in place, and fp32 copies of bf16 / fp16 ones.
KERNEL_CASES = {
    "2x8-lut": (dict(scheme=(2, 8, 1, 8)), 1, "lut"),
    "2x8-dd": (dict(scheme=(2, 8, 1, 8)), 4, "dd"),
    "2x8-gemm": (dict(scheme=(2, 8, 1, 8)), 16, "gemm"),
    "2x8-bf16-lut": (dict(scheme=(2, 8, 1, 8), dtype=torch.bfloat16), 1, "lut"),
    "2x8-bf16-dd": (dict(scheme=(2, 8, 1, 8), dtype=torch.bfloat16), 4, "dd"),
    "1x16-dd": (dict(scheme=(1, 16, 1, 8)), 1, "dd"),
    "1x16-fp16-dd": (dict(scheme=(1, 16, 1, 8), dtype=torch.float16), 1, "dd"),
    "1x16-gemm": (dict(scheme=(1, 16, 1, 8)), 16, "gemm"),
}


def changed(t: torch.Tensor) -> torch.Tensor:
    """A different valid value: codes with a flipped low bit, floats doubled."""
    return t ^ 1 if not t.is_floating_point() else t * 2.0


def change_in_place_no_grad(t):
    with torch.no_grad():
        t.copy_(changed(t))


def change_through_data(t):
    t.data.copy_(changed(t.data))  # bumps no version counter of `t`


def reassign_data(t):
    t.data = changed(t.data)


CHANGES = {
    "no_grad-in-place": change_in_place_no_grad,
    "data-in-place": change_through_data,
    "data-assign": reassign_data,
}
# writes to the codes through `.data` are not detectable cheaply (module docstring of kernels/cpu.py)
UPDATES = [(name, change) for name in ("codes", "codebooks", "scales") for change in CHANGES
           if not (name == "codes" and change == "data-in-place")]


def make_layer(scheme, dtype=None, seed=0):
    bias = torch.randn(32, generator=torch.Generator().manual_seed(seed))
    return AqlmLinear.from_quantized(random_quantized(*scheme, seed=seed), bias=bias, dtype=dtype)


def inputs(rows):
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))


def assert_matches_dequantized(layer, x):
    with torch.no_grad():
        out = layer(x)
        ref = F.linear(x, dequantize(layer.codes, layer.codebooks.float(), layer.scales.float()), layer.bias.float())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))  # the bug: off by 17.9-32


needs_kernels = pytest.mark.skipif(not cpu_kernels_available(), reason="riverone CPU kernels unavailable")


@needs_kernels
@pytest.mark.parametrize("update", UPDATES, ids=[f"{n}-{c}" for n, c in UPDATES])
@pytest.mark.parametrize("case", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_cpu_kernel_follows_every_kind_of_update(case, update):
    layer_kwargs, rows, kernel = case
    name, change = update
    layer = make_layer(**layer_kwargs)
    x = inputs(rows)
    assert_matches_dequantized(layer, x)  # prepares the CPU kernel
    assert layer._cpu_prepared.kernel_for(rows) == kernel
    CHANGES[change](getattr(layer, name))
    assert_matches_dequantized(layer, x)


@needs_kernels
def test_a_stale_cpu_kernel_is_replaced_not_modified():
    layer = make_layer((2, 8, 1, 8))
    x = inputs(1)
    assert_matches_dequantized(layer, x)
    old = layer._cpu_prepared
    lut_codebooks = old.lut_codebooks.clone()
    layer.codebooks.data.mul_(2.0)
    assert_matches_dequantized(layer, x)
    assert layer._cpu_prepared is not old
    assert torch.equal(old.lut_codebooks, lut_codebooks)  # another thread may still be computing with it


@needs_kernels
@pytest.mark.parametrize("case", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_cpu_kernel_follows_an_optimizer_step(case):
    layer_kwargs, rows, _ = case
    layer = make_layer(**layer_kwargs)
    x = inputs(rows)
    assert_matches_dequantized(layer, x)
    layer.codebooks.requires_grad_(True)
    layer.scales.requires_grad_(True)
    optimizer = torch.optim.Adam([layer.codebooks, layer.scales], lr=0.1)
    layer(x).square().sum().backward()  # differentiable path
    optimizer.step()
    layer.requires_grad_(False)
    assert_matches_dequantized(layer, x)


@needs_kernels
@pytest.mark.parametrize("assign", [False, True], ids=["load_state_dict-copy", "load_state_dict-assign"])
@pytest.mark.parametrize("case", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_cpu_kernel_follows_load_state_dict(case, assign):
    layer_kwargs, rows, _ = case
    layer = make_layer(**layer_kwargs)
    x = inputs(rows)
    assert_matches_dequantized(layer, x)
    layer.load_state_dict(make_layer(**layer_kwargs, seed=1).state_dict(), assign=assign)
    assert_matches_dequantized(layer, x)
