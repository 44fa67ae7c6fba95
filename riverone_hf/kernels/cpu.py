"""Fast CPU inference kernels for AQLM-quantized Linear layers (fp32 activations).

API (used by `AqlmLinear`):
  prepared = prepare_cpu_kernel(codes, codebooks, scales)    # once; the caller caches it (None: no kernel)
  y = cpu_matmul(x, prepared, bias)                           # x [..., in_features] -> [..., out_features]

`prepare_cpu_kernel` never mutates its inputs: it keeps a reference to them (to notice in-place
updates, see below), fp32 copies of the small codebooks/scales, and, for codebooks of <= 256 entries,
ONE re-laid-out copy of the codes (same size as the stored codes) for the lookup-table kernel.
`prepare_cpu_kernel(..., cache_dense_weight=True)` also keeps the dequantized fp32 weight
(4 bytes per weight: 8-16x the codes) and uses it for long prompts instead of rebuilding it per call.
If the stored codes/codebooks/scales are modified in place, `cpu_matmul` notices it (tensor version
counters, which `.detach()` shares) and rebuilds what it derived from them; a `param.data = new`
re-assignment is noticed only when the parameters themselves were passed (not `.detach()`ed views,
which keep pointing at the old storage).

Kernels (C++ built once per machine with `torch.utils.cpp_extension.load_inline`, cached under
`$RIVERONE_HF_KERNEL_DIR` or `~/.cache/riverone_hf/cpu_kernels`, called through ctypes; threads are
torch's intra-op threads, so `torch.set_num_threads` applies; each thread owns its outputs or its own
partial sums, so results are the same for any thread count up to float rounding). If the build fails
(no compiler, no torch headers), `prepare_cpu_kernel` warns loudly once and returns None, and the caller
uses its dequantize + matmul path. `RIVERONE_HF_DISABLE_CPU_KERNELS=1` turns the kernels off.

  lut   codebooks of <= 256 entries (1x8, 2x8, ...), out_group_size 1, few rows: per call, per block of
        16 (input group, codebook) pairs, a 16 KiB fp32 table x_group . codebook_entry (L1-resident,
        built with vectorised FMAs), then each output row sums 16 table lookups. Threads split the
        input groups (each keeps its own partial output vector; one reduction at the end), so the
        codes are streamed once, from a copy laid out [input block][output row][16].
  dd    out_group_size 1, in_group_size 8, 1/2/4 codebooks (any size), up to 6 rows: each weight
        group is rebuilt in registers (sum of codebook vectors) and used at once for all rows; 16-bit
        codebooks (2 MiB) are prefetched ahead from the codes, and kept as fp16 when that is lossless
        (codebooks that hold fp16 values, as published AQLM checkpoints do) to halve the cache misses.
  gemm  any layout, up to 32 rows: 4 output rows at a time are dequantized into an L2-resident
        buffer and multiplied with a 4x4 register-blocked kernel.
  dense more rows: the whole weight is dequantized (C++, in parallel) or taken from the opt-in cache,
        then `F.linear` (MKL/oneDNN) does the matmul, which is compute-bound at that size.

Measured (`python bench/kernels.py`, tables in BENCHMARKS.md: 2-core AMD EPYC, torch.set_num_threads(2),
decode passes cycling over 10 distinct layers so that weights are not cache-resident, medians of 7 repeats,
two runs), against dense fp32 `F.linear` at 2560<->9728: batch 1, 2x8 4.7-8.2x faster, 1x8 9.7-15.6x, 1x16
(dd) 2.5-3.3x; batch 16, 1.4-2.9x faster; against the aqlm package's numba kernel (1 numba thread, where it
is correct) 2.9-5.5x faster at batch 1 for 2x8/1x8.

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

import ctypes
import hashlib
import logging
import math
import os
import platform
import threading
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..aq.layout import dequantize

__all__ = [
    "PreparedCpuKernel",
    "cpu_kernels_available",
    "cpu_kernels_build_error",
    "cpu_matmul",
    "prepare_cpu_kernel",
]

logger = logging.getLogger(__name__)

ENV_DISABLE = "RIVERONE_HF_DISABLE_CPU_KERNELS"
ENV_KERNEL_DIR = "RIVERONE_HF_KERNEL_DIR"

_ABI_VERSION = 1
_LUT_TABLE = 256  # entries per lookup table (smaller codebooks are zero-padded)
_LUT_TABLES_PER_BLOCK = 16  # input groups x codebooks per lookup block (16 KiB of fp32)

# Batch-size dispatch (rows = prod(input.shape[:-1])), from measurements (module docstring).
LUT_MAX_ROWS_TIMES_CODEBOOKS = 4  # lut while rows * num_codebooks <= 4 (1x8: <= 4 rows, 2x8: <= 2 rows)
DD_MAX_ROWS = 6
GEMM_MAX_ROWS = 32

_CPP_SOURCE = r"""
// riverone_hf AQLM CPU kernels: C ABI (called through ctypes), threads from torch's intra-op pool.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

constexpr int kTable = 256;  // entries per lookup table (smaller codebooks are zero-padded)

// ---------------------------------------------------------------------------------------------
// lut: lut[n = (j - j0) * K + k][e] = x[j*G : (j+1)*G] . codebook[k][e]   (zero for j >= ng)
//   cbT: [K][G][256]
// ---------------------------------------------------------------------------------------------
template <int G>
void build_lut_g(const float* x, const float* cbT, float* lut, int64_t j0, int64_t j1, int64_t ng, int64_t K) {
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t k = 0; k < K; ++k) {
      float* l = lut + ((j - j0) * K + k) * kTable;
      if (j >= ng) {
        std::memset(l, 0, sizeof(float) * kTable);
        continue;
      }
      const float* xj = x + j * G;
      const float* c = cbT + k * G * kTable;
      float xv[G];
      for (int d = 0; d < G; ++d) xv[d] = xj[d];
      for (int e = 0; e < kTable; ++e) {
        float s = xv[0] * c[e];
#pragma GCC unroll 16
        for (int d = 1; d < G; ++d) s += xv[d] * c[d * kTable + e];
        l[e] = s;
      }
    }
  }
}

void build_lut_any(const float* x, const float* cbT, float* lut, int64_t j0, int64_t j1, int64_t ng, int64_t K,
                   int64_t G) {
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t k = 0; k < K; ++k) {
      float* l = lut + ((j - j0) * K + k) * kTable;
      std::memset(l, 0, sizeof(float) * kTable);
      if (j >= ng) continue;
      const float* xj = x + j * G;
      const float* c = cbT + k * G * kTable;
      for (int64_t d = 0; d < G; ++d) {
        const float xd = xj[d];
        for (int e = 0; e < kTable; ++e) l[e] += xd * c[d * kTable + e];
      }
    }
  }
}

void build_lut(const float* x, const float* cbT, float* lut, int64_t j0, int64_t j1, int64_t ng, int64_t K,
               int64_t G) {
  switch (G) {
    case 8: build_lut_g<8>(x, cbT, lut, j0, j1, ng, K); break;
    case 16: build_lut_g<16>(x, cbT, lut, j0, j1, ng, K); break;
    case 4: build_lut_g<4>(x, cbT, lut, j0, j1, ng, K); break;
    default: build_lut_any(x, cbT, lut, j0, j1, ng, K, G);
  }
}

// acc[i] += sum_n L[n][codes[i][n]], rows i < rows, codes [rows][16]: four rows at a time (8 add chains),
// codes read 8 bytes at once (2x8 decode at 2560<->9728 on Zen 4: 0.69-0.80 ms per layer against 0.89-1.25
// ms with two rows at a time; AVX2/AVX-512 gathers were slower than scalar lookups there).
void lut_block16(const float* L, const uint8_t* codes, float* acc, int64_t rows) {
  constexpr int N = 16;
  int64_t i = 0;
  for (; i + 3 < rows; i += 4) {
    const uint8_t* c = codes + i * N;
    float s[4][2] = {};
#pragma GCC unroll 2
    for (int w = 0; w < N / 8; ++w) {
      uint64_t v[4];
      for (int q = 0; q < 4; ++q) std::memcpy(&v[q], c + q * N + 8 * w, 8);
#pragma GCC unroll 8
      for (int b = 0; b < 8; ++b)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) s[q][b & 1] += L[(8 * w + b) * kTable + ((v[q] >> (8 * b)) & 0xff)];
    }
    for (int q = 0; q < 4; ++q) acc[i + q] += s[q][0] + s[q][1];
  }
  for (; i < rows; ++i) {
    const uint8_t* c = codes + i * N;
    float s0 = 0.f, s1 = 0.f;
    for (int n = 0; n < N; n += 2) {
      s0 += L[n * kTable + c[n]];
      s1 += L[(n + 1) * kTable + c[n + 1]];
    }
    acc[i] += s0 + s1;
  }
}

void lut_block_any(const float* L, const uint8_t* codes, float* acc, int64_t rows, int64_t N) {
  for (int64_t i = 0; i < rows; ++i) {
    const uint8_t* c = codes + i * N;
    float s0 = 0.f, s1 = 0.f;
    int64_t n = 0;
    for (; n + 1 < N; n += 2) {
      s0 += L[n * kTable + c[n]];
      s1 += L[(n + 1) * kTable + c[n + 1]];
    }
    if (n < N) s0 += L[n * kTable + c[n]];
    acc[i] += s0 + s1;
  }
}

// out[b][i] = (sum_t part[t][b][i]) * scale[i] + bias[i], on the calling thread: a few microseconds, and
// a second parallel region would be one more place to wait for a preempted thread on a busy machine
void reduce_scale_bias(const float* part, int64_t nparts, int64_t part_stride, const float* scales,
                       const float* bias, float* out, int64_t m, int64_t out_f) {
  for (int64_t b = 0; b < m; ++b) {
    for (int64_t i = 0; i < out_f; ++i) {
      float s = part[b * out_f + i];
      for (int64_t t = 1; t < nparts; ++t) s += part[t * part_stride + b * out_f + i];
      s *= scales[i];
      if (bias) s += bias[i];
      out[b * out_f + i] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dequantization of rows [r0, r1) into W [r1 - r0][ng * G] (unscaled), any layout
//   codes: stored layout [num_out_groups][ng][K] as unsigned integers; cb: [K][cbsize][OG][G]
// ---------------------------------------------------------------------------------------------
template <typename CT>
void dequant_rows(const CT* codes, int64_t ng, int64_t K, int64_t G, int64_t OG, int64_t cbsize, const float* cb,
                  int64_t r0, int64_t r1, float* W) {
  const int64_t in_f = ng * G;
  if (OG == 1 && G == 8) {
    constexpr int PD = 16;  // prefetch distance (groups): big codebooks (1x16: 2 MiB) do not fit L2
    const bool pf = cbsize > 256;
    for (int64_t r = r0; r < r1; ++r) {
      const CT* c = codes + r * ng * K;
      float* w = W + (r - r0) * in_f;
      if (K == 1) {
        for (int64_t j = 0; j < ng; ++j) {
          if (pf && j + PD < ng) __builtin_prefetch(cb + (int64_t)c[j + PD] * 8);
          store8(w + j * 8, load8(cb + (int64_t)c[j] * 8));
        }
      } else if (K == 2) {
        const float* cb1 = cb + cbsize * 8;
        for (int64_t j = 0; j < ng; ++j) {
          if (pf && j + PD < ng) {
            __builtin_prefetch(cb + (int64_t)c[2 * (j + PD)] * 8);
            __builtin_prefetch(cb1 + (int64_t)c[2 * (j + PD) + 1] * 8);
          }
          store8(w + j * 8, load8(cb + (int64_t)c[2 * j] * 8) + load8(cb1 + (int64_t)c[2 * j + 1] * 8));
        }
      } else {
        for (int64_t j = 0; j < ng; ++j) {
          v8f s = load8(cb + (int64_t)c[j * K] * 8);
          for (int64_t k = 1; k < K; ++k) s += load8(cb + (k * cbsize + (int64_t)c[j * K + k]) * 8);
          store8(w + j * 8, s);
        }
      }
    }
    return;
  }
  const int64_t entry = OG * G;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r / OG, rr = r % OG;
    const CT* c = codes + o * ng * K;
    float* w = W + (r - r0) * in_f;
    for (int64_t j = 0; j < ng; ++j) {
      float* wj = w + j * G;
      const float* e0 = cb + (int64_t)c[j * K] * entry + rr * G;
      for (int64_t d = 0; d < G; ++d) wj[d] = e0[d];
      for (int64_t k = 1; k < K; ++k) {
        const float* ek = cb + (k * cbsize + (int64_t)c[j * K + k]) * entry + rr * G;
        for (int64_t d = 0; d < G; ++d) wj[d] += ek[d];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// gemm: out[b][r0 + r] = x[b] . W[r]; MB x rows by 4 W rows, register-blocked
// ---------------------------------------------------------------------------------------------
template <int MB>
inline void gemm_mb4(const float* xb, int64_t in_f, const float* W, float* out, int64_t out_f, int64_t r0) {
  const int64_t in8 = in_f & ~int64_t(7);
  v8f acc[MB][4] = {};
  for (int64_t p = 0; p < in8; p += 8) {
    v8f w0 = load8(W + p), w1 = load8(W + in_f + p), w2 = load8(W + 2 * in_f + p), w3 = load8(W + 3 * in_f + p);
#pragma GCC unroll 4
    for (int q = 0; q < MB; ++q) {
      v8f xv = load8(xb + q * in_f + p);
      acc[q][0] += xv * w0;
      acc[q][1] += xv * w1;
      acc[q][2] += xv * w2;
      acc[q][3] += xv * w3;
    }
  }
  for (int q = 0; q < MB; ++q)
    for (int r = 0; r < 4; ++r) {
      float s = hsum8(acc[q][r]);
      for (int64_t p = in8; p < in_f; ++p) s += xb[q * in_f + p] * W[r * in_f + p];
      out[q * out_f + r0 + r] = s;
    }
}

void small_gemm(const float* x, int64_t m, int64_t in_f, const float* W, int64_t R, float* out, int64_t out_f,
                int64_t r0) {
  if (R == 4) {
    int64_t b = 0;
    for (; b + 3 < m; b += 4) gemm_mb4<4>(x + b * in_f, in_f, W, out + b * out_f, out_f, r0);
    switch (m - b) {
      case 3: gemm_mb4<3>(x + b * in_f, in_f, W, out + b * out_f, out_f, r0); break;
      case 2: gemm_mb4<2>(x + b * in_f, in_f, W, out + b * out_f, out_f, r0); break;
      case 1: gemm_mb4<1>(x + b * in_f, in_f, W, out + b * out_f, out_f, r0); break;
      default: break;
    }
    return;
  }
  for (int64_t b = 0; b < m; ++b) {
    const float* xb = x + b * in_f;
    for (int64_t r = 0; r < R; ++r) {
      const float* w = W + r * in_f;
      float s = 0.f;
      for (int64_t p = 0; p < in_f; ++p) s += xb[p] * w[p];
      out[b * out_f + r0 + r] = s;
    }
  }
}

template <typename CT>
void dequant_gemm_impl(const float* x, int64_t m, const CT* codes, int64_t out_f, int64_t ng, int64_t K, int64_t G,
                       int64_t OG, int64_t cbsize, const float* cb, const float* scales, const float* bias,
                       float* out) {
  const int64_t in_f = ng * G;
  constexpr int64_t R = 4;
  const int64_t ntiles = (out_f + R - 1) / R;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> W(R * in_f);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * R, r1 = std::min(out_f, r0 + R);
      dequant_rows<CT>(codes, ng, K, G, OG, cbsize, cb, r0, r1, W.data());
      small_gemm(x, m, in_f, W.data(), r1 - r0, out, out_f, r0);
      for (int64_t b = 0; b < m; ++b)
        for (int64_t r = r0; r < r1; ++r) {
          float s = out[b * out_f + r] * scales[r / OG];
          if (bias) s += bias[r];
          out[b * out_f + r] = s;
        }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// dd: fused dequantize-dot for <= 4 rows at a time (out_group_size 1, in_group_size 8): each weight
// group is rebuilt in registers and used at once; two output rows share the x loads.
//   cb: [K][cbsize][8] fp32, or fp16 when HALF (a lossless copy)
// ---------------------------------------------------------------------------------------------
template <bool HALF>
inline v8f cbload(const void* cb, int64_t idx) {
  if constexpr (HALF) {
#if defined(__F16C__)
    __m256 v = _mm256_cvtph_ps(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(cb) + idx * 8)));
    v8f r;
    std::memcpy(&r, &v, sizeof(r));
    return r;
#else
    const _Float16* h = static_cast<const _Float16*>(cb) + idx * 8;
    v8f r;
    for (int d = 0; d < 8; ++d) r[d] = (float)h[d];
    return r;
#endif
  } else {
    return load8(static_cast<const float*>(cb) + idx * 8);
  }
}

template <typename CT, int M, int K, bool HALF>
void dd_rows(const float* x, int64_t in_f, const CT* codes, int64_t ng, int64_t cbsize, const void* cb,
             const float* scales, const float* bias, float* out, int64_t out_f, int64_t r0, int64_t r1) {
  constexpr int PD = 16;  // prefetch distance (groups)
  constexpr int64_t EB = 8 * (HALF ? 2 : 4);  // bytes per codebook vector
  const char* cbc = static_cast<const char*>(cb);
  const bool pf = cbsize > 256;
  int64_t r = r0;
  for (; r + 1 < r1; r += 2) {
    const CT* ca = codes + r * ng * K;
    const CT* cn = ca + ng * K;
    v8f acc[2][M] = {};
    for (int64_t j = 0; j < ng; ++j) {
      if (pf && j + PD < ng) {
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) {
          __builtin_prefetch(cbc + (k * cbsize + (int64_t)ca[(j + PD) * K + k]) * EB);
          __builtin_prefetch(cbc + (k * cbsize + (int64_t)cn[(j + PD) * K + k]) * EB);
        }
      }
      v8f wa = cbload<HALF>(cb, ca[j * K]);
      v8f wb = cbload<HALF>(cb, cn[j * K]);
#pragma GCC unroll 4
      for (int k = 1; k < K; ++k) {
        wa += cbload<HALF>(cb, k * cbsize + ca[j * K + k]);
        wb += cbload<HALF>(cb, k * cbsize + cn[j * K + k]);
      }
#pragma GCC unroll 4
      for (int b = 0; b < M; ++b) {
        v8f xv = load8(x + b * in_f + j * 8);
        acc[0][b] += wa * xv;
        acc[1][b] += wb * xv;
      }
    }
    for (int q = 0; q < 2; ++q)
      for (int b = 0; b < M; ++b) {
        float s = hsum8(acc[q][b]) * scales[r + q];
        if (bias) s += bias[r + q];
        out[b * out_f + r + q] = s;
      }
  }
  for (; r < r1; ++r) {
    const CT* ca = codes + r * ng * K;
    v8f acc[M] = {};
    for (int64_t j = 0; j < ng; ++j) {
      v8f wa = cbload<HALF>(cb, ca[j * K]);
      for (int k = 1; k < K; ++k) wa += cbload<HALF>(cb, k * cbsize + ca[j * K + k]);
      for (int b = 0; b < M; ++b) acc[b] += wa * load8(x + b * in_f + j * 8);
    }
    for (int b = 0; b < M; ++b) {
      float s = hsum8(acc[b]) * scales[r];
      if (bias) s += bias[r];
      out[b * out_f + r] = s;
    }
  }
}

template <typename CT, int K, bool HALF>
void dd_impl(const float* x, int64_t m, int64_t in_f, const CT* codes, int64_t ng, int64_t cbsize, const void* cb,
             const float* scales, const float* bias, float* out, int64_t out_f) {
  at::parallel_for(0, out_f, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t b0 = 0; b0 < m; b0 += 4) {
      const float* xb = x + b0 * in_f;
      float* ob = out + b0 * out_f;
      switch (std::min<int64_t>(4, m - b0)) {
        case 1: dd_rows<CT, 1, K, HALF>(xb, in_f, codes, ng, cbsize, cb, scales, bias, ob, out_f, r0, r1); break;
        case 2: dd_rows<CT, 2, K, HALF>(xb, in_f, codes, ng, cbsize, cb, scales, bias, ob, out_f, r0, r1); break;
        case 3: dd_rows<CT, 3, K, HALF>(xb, in_f, codes, ng, cbsize, cb, scales, bias, ob, out_f, r0, r1); break;
        default: dd_rows<CT, 4, K, HALF>(xb, in_f, codes, ng, cbsize, cb, scales, bias, ob, out_f, r0, r1); break;
      }
    }
  });
}

template <typename CT, bool HALF>
bool dd_dispatch(const float* x, int64_t m, int64_t in_f, const CT* codes, int64_t ng, int64_t K, int64_t cbsize,
                 const void* cb, const float* scales, const float* bias, float* out, int64_t out_f) {
  switch (K) {
    case 1: dd_impl<CT, 1, HALF>(x, m, in_f, codes, ng, cbsize, cb, scales, bias, out, out_f); return true;
    case 2: dd_impl<CT, 2, HALF>(x, m, in_f, codes, ng, cbsize, cb, scales, bias, out, out_f); return true;
    case 4: dd_impl<CT, 4, HALF>(x, m, in_f, codes, ng, cbsize, cb, scales, bias, out, out_f); return true;
    default: return false;
  }
}

}  // namespace

// Every entry point returns 0 on success, 1 for an unsupported layout, -1 on an exception.
extern "C" {

int64_t rv_abi_version() { return 1; }

// x [m][ng*G]; codesR [nblk][out_f][J*K] uint8; cbT [K][G][256]; scales [out_f]; bias [out_f] or null
int64_t rv_lut(const float* x, int64_t m, int64_t ng, int64_t G, const uint8_t* codesR, int64_t nblk, int64_t J,
               int64_t K, const float* cbT, const float* scales, const float* bias, float* out, int64_t out_f) {
  try {
    const int64_t N = J * K;
    const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nblk));
    const int64_t part_stride = m * out_f;
    std::vector<float> part(nparts * part_stride, 0.f);
    const int64_t in_f = ng * G;
    // one contiguous range of input blocks per thread; each thread owns its partial sums
    at::parallel_for(0, nparts, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> L(N * kTable);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c0 = nblk * p / nparts, c1 = nblk * (p + 1) / nparts;
        float* acc = part.data() + p * part_stride;
        for (int64_t blk = c0; blk < c1; ++blk) {
          const uint8_t* cc = codesR + blk * out_f * N;
          for (int64_t b = 0; b < m; ++b) {
            build_lut(x + b * in_f, cbT, L.data(), blk * J, blk * J + J, ng, K, G);
            if (N == 16)
              lut_block16(L.data(), cc, acc + b * out_f, out_f);
            else
              lut_block_any(L.data(), cc, acc + b * out_f, out_f, N);
          }
        }
      }
    });
    reduce_scale_bias(part.data(), nparts, part_stride, scales, bias, out, m, out_f);
    return 0;
  } catch (...) {
    return -1;
  }
}

// codes: stored layout as unsigned (code_bytes 1 or 2); out_f = num_out_groups * OG; scales per out group
int64_t rv_gemm(const float* x, int64_t m, const void* codes, int64_t code_bytes, int64_t out_f, int64_t ng,
                int64_t K, int64_t G, int64_t OG, int64_t cbsize, const float* cb, const float* scales,
                const float* bias, float* out) {
  try {
    if (code_bytes == 1)
      dequant_gemm_impl<uint8_t>(x, m, static_cast<const uint8_t*>(codes), out_f, ng, K, G, OG, cbsize, cb, scales,
                                 bias, out);
    else
      dequant_gemm_impl<uint16_t>(x, m, static_cast<const uint16_t*>(codes), out_f, ng, K, G, OG, cbsize, cb,
                                  scales, bias, out);
    return 0;
  } catch (...) {
    return -1;
  }
}

// the scaled fp32 weight W [out_f][ng*G]
int64_t rv_dequant(const void* codes, int64_t code_bytes, int64_t out_f, int64_t ng, int64_t K, int64_t G,
                   int64_t OG, int64_t cbsize, const float* cb, const float* scales, float* W) {
  try {
    const int64_t in_f = ng * G;
    at::parallel_for(0, out_f / OG, 16, [&](int64_t o0, int64_t o1) {
      if (code_bytes == 1)
        dequant_rows<uint8_t>(static_cast<const uint8_t*>(codes), ng, K, G, OG, cbsize, cb, o0 * OG, o1 * OG,
                              W + o0 * OG * in_f);
      else
        dequant_rows<uint16_t>(static_cast<const uint16_t*>(codes), ng, K, G, OG, cbsize, cb, o0 * OG, o1 * OG,
                               W + o0 * OG * in_f);
      for (int64_t r = o0 * OG; r < o1 * OG; ++r) {
        const float s = scales[r / OG];
        float* w = W + r * in_f;
        for (int64_t p = 0; p < in_f; ++p) w[p] *= s;
      }
    });
    return 0;
  } catch (...) {
    return -1;
  }
}

// out_group_size 1, in_group_size 8, K in {1, 2, 4}; cb fp32 or (cb_half) fp16 [K][cbsize][8]
int64_t rv_dd(const float* x, int64_t m, const void* codes, int64_t code_bytes, int64_t out_f, int64_t ng, int64_t K,
              int64_t cbsize, const void* cb, int64_t cb_half, const float* scales, const float* bias, float* out) {
  try {
    const int64_t in_f = ng * 8;
    bool ok;
    if (code_bytes == 1) {
      const uint8_t* c = static_cast<const uint8_t*>(codes);
      ok = cb_half ? dd_dispatch<uint8_t, true>(x, m, in_f, c, ng, K, cbsize, cb, scales, bias, out, out_f)
                   : dd_dispatch<uint8_t, false>(x, m, in_f, c, ng, K, cbsize, cb, scales, bias, out, out_f);
    } else {
      const uint16_t* c = static_cast<const uint16_t*>(codes);
      ok = cb_half ? dd_dispatch<uint16_t, true>(x, m, in_f, c, ng, K, cbsize, cb, scales, bias, out, out_f)
                   : dd_dispatch<uint16_t, false>(x, m, in_f, c, ng, K, cbsize, cb, scales, bias, out, out_f);
    }
    return ok ? 0 : 1;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
"""


# ------------------------------------------------------------------------------------------------
# building / loading the library
# ------------------------------------------------------------------------------------------------
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_cflags() -> list[str]:
    """Compiler flags for the vector ISA this CPU has (the build is cached per flag set)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = _cpu_flags()
    out: list[str] = []
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        out += ["-mavx2", "-mfma", "-mf16c", "-mbmi2"]
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            out += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    return out


def _kernel_dir() -> str:
    base = os.environ.get(ENV_KERNEL_DIR)
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(cache, "riverone_hf", "cpu_kernels")
    return base


def _bind(lib: ctypes.CDLL) -> None:
    P, I = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "rv_abi_version": [],
        "rv_lut": [P, I, I, I, P, I, I, I, P, P, P, P, I],
        "rv_gemm": [P, I, P, I, I, I, I, I, I, I, P, P, P, P],
        "rv_dequant": [P, I, I, I, I, I, I, I, P, P, P],
        "rv_dd": [P, I, P, I, I, I, I, I, P, I, P, P, P],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = I


def _library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, then loaded from the cache dir), or None if unavailable."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lib_lock:
        if _lib is not None or _lib_error is not None:
            return _lib
        cflags = ["-O3", "-fopenmp", *_isa_cflags()]
        digest = hashlib.sha256(
            "\n".join([_CPP_SOURCE, " ".join(cflags), torch.__version__, platform.machine()]).encode()
        ).hexdigest()[:16]
        name = f"riverone_aqlm_cpu_{digest}"
        build_dir = os.path.join(_kernel_dir(), name)
        try:
            from torch.utils.cpp_extension import load_inline

            os.makedirs(build_dir, exist_ok=True)
            path = load_inline(
                name=name,
                cpp_sources=[_CPP_SOURCE],
                extra_cflags=cflags,
                extra_ldflags=["-fopenmp"],
                build_directory=build_dir,
                is_python_module=False,
                no_implicit_headers=True,
                verbose=False,
            )
            lib = ctypes.CDLL(path)
            _bind(lib)
            if lib.rv_abi_version() != _ABI_VERSION:
                raise RuntimeError(f"kernel library {path} has ABI {lib.rv_abi_version()}, expected {_ABI_VERSION}")
            _lib = lib
        except Exception as exc:  # noqa: BLE001 - any build/load failure means: no kernels, say so loudly
            _lib_error = f"{type(exc).__name__}: {exc}"
            message = (
                "riverone_hf: could not build/load the AQLM CPU kernels (needs a C++ compiler and the torch "
                f"headers; build dir {build_dir}). Falling back to dequantize + matmul, which is several times "
                f"slower and allocates the full fp32 weight on every call. Cause: {_lib_error}"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            logger.warning(message)
    return _lib


def cpu_kernels_available() -> bool:
    """Whether the compiled kernels can be used (builds them on first call; False if disabled by env)."""
    if os.environ.get(ENV_DISABLE, "").strip() not in ("", "0"):
        return False
    return _library() is not None


def cpu_kernels_build_error() -> str | None:
    """Why the kernels could not be built/loaded, or None."""
    return _lib_error


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"riverone_hf CPU kernel {what} failed (status {status})")


# ------------------------------------------------------------------------------------------------
# prepared state
# ------------------------------------------------------------------------------------------------
def _source_key(*tensors: torch.Tensor) -> tuple:
    key = []
    for t in tensors:
        try:
            version = t._version
        except RuntimeError:  # inference tensors have no version counter (and cannot change in place)
            version = -1
        key.append((t.data_ptr(), version, tuple(t.shape), t.dtype))
    return tuple(key)


@dataclass(eq=False)
class PreparedCpuKernel:
    """What `cpu_matmul` needs for one AQLM weight, derived once from (codes, codebooks, scales).

    Holds references to the source tensors (never writes them) to notice in-place updates.
    Row thresholds (`lut_max_rows`, `dd_max_rows`, `gemm_max_rows`) pick the kernel per call.
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
    codes: torch.Tensor = field(repr=False)  # stored layout, unsigned view/copy
    codebooks: torch.Tensor = field(repr=False)  # fp32 [K, 2^B, OG, G]
    codebooks_half: torch.Tensor | None = field(repr=False)  # fp16 copy when lossless (16-bit codebooks)
    scales: torch.Tensor = field(repr=False)  # fp32 [num_out_groups]
    lut_codes: torch.Tensor | None = field(repr=False)  # [nblk, out_features, J*K] uint8
    lut_codebooks: torch.Tensor | None = field(repr=False)  # fp32 [K, G, 256]
    lut_groups_per_block: int
    dense_weight: torch.Tensor | None = field(repr=False)
    _sources: tuple = field(repr=False)
    _key: tuple = field(repr=False)

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
        """Memory this object holds beyond the source tensors."""
        own = [self.codebooks, self.codebooks_half, self.scales, self.lut_codes, self.lut_codebooks, self.dense_weight]
        total = sum(t.numel() * t.element_size() for t in own if t is not None)
        if self.codes.data_ptr() != self._sources[0].data_ptr():
            total += self.codes.numel() * self.codes.element_size()
        return total

    def is_current(self) -> bool:
        return _source_key(*self._sources) == self._key

    def refresh(self) -> None:
        """Rebuild everything derived from the sources (after they changed in place)."""
        new = _build_prepared(*self._sources, cache_dense_weight=self.cache_dense_weight)
        for name in self.__dataclass_fields__:
            if name not in ("lut_max_rows", "dd_max_rows", "gemm_max_rows"):
                setattr(self, name, getattr(new, name))


def _build_prepared(
    codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, *, cache_dense_weight: bool
) -> PreparedCpuKernel:
    key = _source_key(codes, codebooks, scales)
    num_out_groups, num_in_groups, num_codebooks = codes.shape
    cb_k, codebook_size, out_group_size, in_group_size = codebooks.shape
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
        cb_half = None
        if codebook_size > 256 and cb32.abs().max() < 6.0e4:
            half = cb32.to(torch.float16)
            if torch.equal(half.to(torch.float32), cb32):
                cb_half = half
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
            _sources=(codes, codebooks, scales),
            _key=key,
        )
        if cache_dense_weight:
            prepared.dense_weight = _dequantize_fp32(prepared)
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
    Never mutates its inputs. `cache_dense_weight=True` also keeps the fp32 dequantized weight
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
    lib = _library()
    W = torch.empty(p.out_features, p.in_features, dtype=torch.float32)
    _check(
        lib.rv_dequant(
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
    Inference only: when autograd needs a graph through input or bias, this uses the differentiable
    dequantize + `F.linear` instead.
    """
    if input.shape[-1] != prepared.in_features:
        raise ValueError(f"expected input [..., {prepared.in_features}], got {tuple(input.shape)}")
    if not prepared.is_current():
        prepared.refresh()
    if torch.is_grad_enabled() and (input.requires_grad or (bias is not None and bias.requires_grad)):
        weight = dequantize(*prepared._sources).to(input.dtype)
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
    if which == "lut" and prepared.lut_codes is None:
        raise ValueError(f"no lookup-table kernel for {prepared.scheme} with out_group_size {prepared.out_group_size}")
    if which == "dd" and not prepared._dd_ok:
        raise ValueError("the dd kernel needs out_group_size 1, in_group_size 8 and 1, 2 or 4 codebooks")

    if which == "dense":
        weight = prepared.dense_weight if prepared.dense_weight is not None else _dequantize_fp32(prepared)
        out = F.linear(x, weight, b)
    else:
        lib = _library()
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
        elif which == "gemm":
            status = lib.rv_gemm(
                _ptr(x), rows, _ptr(prepared.codes), prepared.codes.element_size(), prepared.out_features, ng,
                prepared.num_codebooks, prepared.in_group_size, prepared.out_group_size,
                prepared.codebooks.shape[1], _ptr(prepared.codebooks), _ptr(prepared.scales), _ptr(b), _ptr(out),
            )
        else:
            raise ValueError(f"unknown kernel {which!r}; expected lut, dd, gemm or dense")
        _check(status, which)
    if out.dtype != out_dtype:
        out = out.to(out_dtype)
    return out.reshape(*lead, prepared.out_features)
