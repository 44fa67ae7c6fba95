"""Correctness of the AQLM CPU kernels (riverone_hf.kernels.cpu) against dequantize + F.linear.

Small shapes only; every kernel (lut / dd / gemm / dense) is checked for 1 and 2 torch threads, and the
stored codes must be untouched afterwards. (No numba is involved: the kernels are C++ on torch threads.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from riverone_hf.kernels import build, cpu as ck
from riverone_hf.aq.layout import dequantize, pack_codes

needs_kernels = pytest.mark.skipif(
    not ck.cpu_kernels_available(), reason=f"CPU kernels unavailable: {ck.cpu_kernels_build_error()}"
)


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def num_threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def make_weight(num_codebooks, nbits, out_features=72, in_features=296, out_group=1, in_group=8, seed=0, half=False):
    g = torch.Generator().manual_seed(seed)
    codes = pack_codes(
        torch.randint(0, 2**nbits, (out_features // out_group, in_features // in_group, num_codebooks), generator=g),
        nbits,
    )
    codebooks = torch.randn(num_codebooks, 2**nbits, out_group, in_group, generator=g)
    if half:
        codebooks = codebooks.half().float()
    scales = torch.rand(out_features // out_group, 1, 1, 1, generator=g) + 0.5
    bias = torch.randn(out_features, generator=g)
    return codes, codebooks, scales, bias


def assert_matches(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-6)


SCHEMES = [(1, 8), (2, 8), (1, 16)]


@needs_kernels
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 16])
def test_default_dispatch_matches_dequantized_matmul(scheme, rows, num_threads):
    codes, codebooks, scales, bias = make_weight(*scheme)
    stored = codes.clone()
    prepared = ck.prepare_cpu_kernel(codes, codebooks, scales)
    assert prepared is not None
    x = torch.randn(rows, codes.shape[1] * 8)
    ref = F.linear(x, dequantize(codes, codebooks, scales), bias)
    for _ in range(2):  # a second call must not see any state left by the first
        assert_matches(ck.cpu_matmul(x, prepared, bias), ref)
    assert torch.equal(codes, stored), "the stored codes were modified"


# every kernel that serves the scheme (lookup tables only exist for codebooks of <= 256 entries)
KERNEL_CASES = [(s, k) for s in SCHEMES for k in ("lut", "dd", "gemm", "dense") if not (k == "lut" and s[1] > 8)]


@needs_kernels
@pytest.mark.parametrize("scheme, kernel", KERNEL_CASES, ids=[f"{s[0]}x{s[1]}-{k}" for s, k in KERNEL_CASES])
def test_every_kernel_every_row_count(scheme, kernel, num_threads):
    # 37 input groups: not a multiple of the lookup block (16 tables), so the padded tail is exercised
    codes, codebooks, scales, bias = make_weight(*scheme, out_features=70, in_features=37 * 8, seed=1)
    stored = codes.clone()
    prepared = ck.prepare_cpu_kernel(codes, codebooks, scales)
    weight = dequantize(codes, codebooks, scales)
    for rows in (1, 2, 3, 5, 9):
        x = torch.randn(rows, 37 * 8)
        assert_matches(ck.cpu_matmul(x, prepared, bias, kernel=kernel), F.linear(x, weight, bias))
        assert_matches(ck.cpu_matmul(x, prepared, None, kernel=kernel), F.linear(x, weight))
    assert torch.equal(codes, stored)


@needs_kernels
@pytest.mark.parametrize(
    "layout",
    [
        dict(num_codebooks=3, nbits=6),  # 3 codebooks, 64 entries: padded tables, generic lookup block
        dict(num_codebooks=2, nbits=8, out_group=2, in_group=4),  # out groups > 1: gemm path
        dict(num_codebooks=1, nbits=8, in_group=5, in_features=200),  # odd group size
        dict(num_codebooks=4, nbits=4, in_group=16, in_features=320),
        dict(num_codebooks=1, nbits=12),  # 12-bit codes stored in int16
    ],
    ids=["3x6", "2x8-og2-ig4", "1x8-ig5", "4x4-ig16", "1x12"],
)
def test_other_layouts(layout, num_threads):
    codes, codebooks, scales, bias = make_weight(**layout, seed=2)
    stored = codes.clone()
    prepared = ck.prepare_cpu_kernel(codes, codebooks, scales)
    weight = dequantize(codes, codebooks, scales)
    kernels = ["gemm", "dense"]
    if prepared.lut_codes is not None:
        kernels.append("lut")
    if prepared._dd_ok:
        kernels.append("dd")
    for kernel in kernels:
        for rows in (1, 4, 7):
            x = torch.randn(rows, weight.shape[1])
            assert_matches(ck.cpu_matmul(x, prepared, bias, kernel=kernel), F.linear(x, weight, bias))
    assert torch.equal(codes, stored)


@needs_kernels
def test_fp16_codebooks_are_read_in_place_as_fp16(num_threads):
    codes, codebooks, scales, bias = make_weight(1, 16, half=True)
    half_codebooks = codebooks.half()
    prepared = ck.prepare_cpu_kernel(codes, half_codebooks, scales)
    assert prepared.codebooks_half.data_ptr() == half_codebooks.data_ptr()
    assert prepared.content_checks["dd"] == ()  # nothing derived to go stale
    x = torch.randn(3, codes.shape[1] * 8)
    weight = dequantize(codes, codebooks, scales)
    assert_matches(ck.cpu_matmul(x, prepared, bias, kernel="dd"), F.linear(x, weight, bias))
    # fp32 codebooks (even holding fp16 values) are read as fp32, in place
    assert ck.prepare_cpu_kernel(codes, codebooks, scales).codebooks_half is None


@needs_kernels
def test_dispatch_thresholds_and_cached_dense_weight():
    codes, codebooks, scales, bias = make_weight(2, 8)
    prepared = ck.prepare_cpu_kernel(codes, codebooks, scales)
    assert [prepared.kernel_for(r) for r in (1, 2, 3, 6, 7, 32, 33)] == [
        "lut", "lut", "dd", "dd", "gemm", "gemm", "dense"
    ]
    assert prepared.dense_weight is None
    cached = ck.prepare_cpu_kernel(codes, codebooks, scales, cache_dense_weight=True)
    weight = dequantize(codes, codebooks, scales)
    assert torch.allclose(cached.dense_weight, weight, rtol=1e-6, atol=1e-6)
    x = torch.randn(40, codes.shape[1] * 8)
    assert_matches(ck.cpu_matmul(x, cached, bias), F.linear(x, weight, bias))
    assert cached.extra_bytes() >= weight.numel() * 4


@needs_kernels
def test_shapes_dtypes_and_autograd():
    codes, codebooks, scales, bias = make_weight(2, 8)
    prepared = ck.prepare_cpu_kernel(codes, codebooks, scales)
    weight = dequantize(codes, codebooks, scales)
    x = torch.randn(2, 3, codes.shape[1] * 8)
    out = ck.cpu_matmul(x, prepared, bias)
    assert out.shape == (2, 3, 72)
    assert_matches(out, F.linear(x, weight, bias))
    vec = torch.randn(codes.shape[1] * 8)
    assert ck.cpu_matmul(vec, prepared, bias).shape == (72,)
    assert ck.cpu_matmul(torch.randn(0, codes.shape[1] * 8), prepared, bias).shape == (0, 72)
    xb = x.to(torch.bfloat16)
    outb = ck.cpu_matmul(xb, prepared, bias)
    assert outb.dtype == torch.bfloat16
    torch.testing.assert_close(outb.float(), F.linear(xb.float(), weight, bias), rtol=2e-2, atol=2e-2 * float(out.abs().max()))
    xg = x.clone().requires_grad_(True)
    ck.cpu_matmul(xg, prepared, bias).sum().backward()
    assert_matches(xg.grad, weight.sum(0).expand_as(x))
    with pytest.raises(ValueError):
        ck.cpu_matmul(torch.randn(1, 8), prepared, bias)


@needs_kernels
def test_a_prepared_kernel_whose_sources_changed_raises_and_stays_as_it_was():
    codes, codebooks, scales, bias = make_weight(2, 8)
    prepared = ck.prepare_cpu_kernel(codes, codebooks, scales)
    lut_codebooks = prepared.lut_codebooks.clone()
    x = torch.randn(1, codes.shape[1] * 8)
    with torch.no_grad():
        codebooks.mul_(2.0)
        codes[0, 0, 0] = codes[0, 0, 0] ^ 1
    assert not prepared.is_current()
    with pytest.raises(ck.StaleKernelError, match="prepare_cpu_kernel again"):
        ck.cpu_matmul(x, prepared, bias)
    assert torch.equal(prepared.lut_codebooks, lut_codebooks), "the stale object was modified"
    fresh = ck.prepare_cpu_kernel(codes, codebooks, scales)
    assert_matches(ck.cpu_matmul(x, fresh, bias), F.linear(x, dequantize(codes, codebooks, scales), bias))


@needs_kernels
def test_parameters_reassigned_through_data_make_it_stale():
    codes, codebooks, scales, bias = (torch.nn.Parameter(t, requires_grad=False) for t in make_weight(2, 8))
    prepared = ck.prepare_cpu_kernel(codes, codebooks, scales)  # the parameters themselves, not .detach()
    new_codes, new_codebooks, new_scales, _ = make_weight(2, 8, seed=5)
    codes.data, codebooks.data, scales.data = new_codes, new_codebooks, new_scales
    assert not prepared.is_current()
    with pytest.raises(ck.StaleKernelError):
        ck.cpu_matmul(torch.randn(1, codes.shape[1] * 8), prepared, bias)


@needs_kernels
def test_untracked_writes_are_checked_only_where_a_kernel_reads_a_copy():
    codes, codebooks, scales, bias = make_weight(2, 8)
    prepared = ck.prepare_cpu_kernel(codes, codebooks, scales)
    assert prepared.content_checks == {"lut": ("codebooks",), "dd": (), "gemm": (), "dense": ()}  # fp32: in place
    codebooks.data.mul_(2.0)  # `.data` has its own version counter: only the content tells
    assert not prepared.is_current("lut") and prepared.is_current("gemm")
    x = torch.randn(4, codes.shape[1] * 8)
    weight = dequantize(codes, codebooks, scales)
    assert_matches(ck.cpu_matmul(x, prepared, bias, kernel="gemm"), F.linear(x, weight, bias))
    half = ck.prepare_cpu_kernel(codes, codebooks.half(), scales.half())  # fp32 copies of both
    assert half.content_checks == {k: ("codebooks", "scales") for k in ("lut", "dd", "gemm", "dense")}


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(ck.ENV_DISABLE, "1")
    codes, codebooks, scales, _ = make_weight(2, 8)
    assert ck.prepare_cpu_kernel(codes, codebooks, scales) is None


def test_build_failure_falls_back_loudly(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(build, "_lib", None)
    monkeypatch.setattr(build, "_lib_error", None)
    monkeypatch.setenv(ck.ENV_KERNEL_DIR, str(tmp_path))
    codes, codebooks, scales, _ = make_weight(2, 8)
    with pytest.warns(RuntimeWarning, match="could not build"):
        assert ck.prepare_cpu_kernel(codes, codebooks, scales) is None
    assert "no compiler here" in ck.cpu_kernels_build_error()


def test_not_on_cpu_or_bad_shapes():
    codes, codebooks, scales, _ = make_weight(2, 8)
    with pytest.raises(ValueError):
        ck.prepare_cpu_kernel(codes[0], codebooks, scales)
    with pytest.raises(ValueError):
        ck.prepare_cpu_kernel(codes, codebooks, scales[:-1])
    meta = [t.to("meta") for t in (codes, codebooks, scales)]
    assert ck.prepare_cpu_kernel(*meta) is None


@needs_kernels
def test_forcing_a_kernel_the_scheme_lacks_is_a_clear_error():
    codes, codebooks, scales, _ = make_weight(1, 16, out_features=8, in_features=16, seed=0)
    prepared = ck.prepare_cpu_kernel(codes, codebooks, scales)
    with pytest.raises(ValueError, match="no lookup-table kernel for 1x16"):
        ck.cpu_matmul(torch.randn(1, 16), prepared, kernel="lut")
