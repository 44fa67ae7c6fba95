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
