// The one register-blocked micro-kernel of the CPU backend and the tile loops
// around it. Every matrix product in the forward and backward passes has the
// shape  C[m][lanes] (+)= A[m][k] · B[k][lanes]  with the SIMD lanes running
// along C's rows in memory, and A read by scalar broadcasts through two strides
// (so A can be a row-major tile or the transpose of one without a copy).
//
// Internal linkage: see flash_fwd_impl.h on why each ISA unit keeps its own copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/simd.h"

namespace steelattn::cpu {
namespace {

// MR rows of C, NV vectors of lanes at column `col`. With kAcc, C is loaded and
// (when col_scale is given) multiplied lane-wise by col_scale[col..] first.
template <class Isa, int MR, int NV, bool kAcc>
inline void gemm_tile(const typename Isa::T* a, int64_t a_rs, int64_t a_ks, const typename Isa::T* b, int64_t b_ld,
                      int64_t K, typename Isa::T* c, int64_t c_ld, int64_t col, const typename Isa::T* col_scale) {
  using V = typename Isa::V;
  using T = typename Isa::T;
  constexpr int W = Isa::W;
  V acc[MR][NV];
  if constexpr (kAcc) {
    V s[NV];
    for (int v = 0; v < NV; ++v) s[v] = col_scale ? Isa::load(col_scale + col + v * W) : Isa::set1(T(1));
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = Isa::mul(s[v], Isa::load(c + r * c_ld + col + v * W));
  } else {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = Isa::zero();
  }
  const T* bp = b + col;
  const T* ap = a;
  for (int64_t kk = 0; kk < K; ++kk, bp += b_ld, ap += a_ks) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Isa::load(bp + v * W);
    for (int r = 0; r < MR; ++r) {
      const V av = Isa::set1(ap[r * a_rs]);
      for (int v = 0; v < NV; ++v) acc[r][v] = Isa::fma(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) Isa::store(c + r * c_ld + col + v * W, acc[r][v]);
}

template <class Isa, int MR, bool kAcc>
inline void gemm_rows(const typename Isa::T* a, int64_t a_rs, int64_t a_ks, const typename Isa::T* b, int64_t b_ld,
                      int64_t K, typename Isa::T* c, int64_t c_ld, int64_t lanes, const typename Isa::T* col_scale) {
  constexpr int W = Isa::W;
  int64_t col = 0;
  for (; col + 2 * W <= lanes; col += 2 * W)
    gemm_tile<Isa, MR, 2, kAcc>(a, a_rs, a_ks, b, b_ld, K, c, c_ld, col, col_scale);
  if (col < lanes) gemm_tile<Isa, MR, 1, kAcc>(a, a_rs, a_ks, b, b_ld, K, c, c_ld, col, col_scale);
}

// Picks the compile-time row count for the ragged last group of rows.
template <class Isa, int MR, bool kAcc>
inline void gemm_tail(int m, const typename Isa::T* a, int64_t a_rs, int64_t a_ks, const typename Isa::T* b,
                      int64_t b_ld, int64_t K, typename Isa::T* c, int64_t c_ld, int64_t lanes,
                      const typename Isa::T* col_scale) {
  if constexpr (MR > 0) {
    if (m == MR) return gemm_rows<Isa, MR, kAcc>(a, a_rs, a_ks, b, b_ld, K, c, c_ld, lanes, col_scale);
    gemm_tail<Isa, MR - 1, kAcc>(m, a, a_rs, a_ks, b, b_ld, K, c, c_ld, lanes, col_scale);
  }
}

// C[m][lanes] (+)= A[m][K] · B[K][lanes]; A element (r, kk) is a[r * a_rs + kk * a_ks];
// `lanes` is a multiple of the SIMD width and B/C rows are padded to it.
template <class Isa, bool kAcc>
void gemm(int64_t m, int64_t lanes, int64_t K, const typename Isa::T* a, int64_t a_rs, int64_t a_ks,
          const typename Isa::T* b, int64_t b_ld, typename Isa::T* c, int64_t c_ld,
          const typename Isa::T* col_scale = nullptr) {
  constexpr int MR = Isa::kRows;
  int64_t r = 0;
  for (; r + MR <= m; r += MR)
    gemm_rows<Isa, MR, kAcc>(a + r * a_rs, a_rs, a_ks, b, b_ld, K, c + r * c_ld, c_ld, lanes, col_scale);
  if (r < m)
    gemm_tail<Isa, MR - 1, kAcc>(int(m - r), a + r * a_rs, a_rs, a_ks, b, b_ld, K, c + r * c_ld, c_ld, lanes,
                                 col_scale);
}

// bf16 pair product, and fp32 rows rounded to bf16 (defined below where the instruction
// set has vdpbf16ps; the kernels call them only under `if constexpr (Isa::kBf16Dot)`).
template <class Isa, bool kAcc = false>
void gemm_bf16(int64_t m, int64_t lanes, int64_t K, const uint16_t* a, int64_t a_rs, const uint16_t* b, int64_t ld,
               float* c, int64_t c_ld, int64_t a_ps = 2, const float* col_scale = nullptr);
template <class Isa>
void round_rows_bf16(const float* src, int64_t m, int64_t k, int64_t ld, uint16_t* dst);
template <class Isa>
void round_row_pairs_bf16(const float* src, int64_t n, int64_t ld, int64_t lanes, uint16_t* dst);
template <class Isa>
void pair_rows_bf16(const uint16_t* r0, const uint16_t* r1, int64_t width, int64_t width_p, uint16_t* out);
template <class Isa>
void row_pairs_bf16(const uint16_t* src, int64_t src_rs, int64_t n, int64_t width, int64_t width_p, uint16_t* dst);

#if defined(__AVX512BF16__)
// C[m][lanes] = A[m][K] . B[K][lanes] for bf16 A and B, K even, with vdpbf16ps: A holds
// bf16 pairs along K, element (r, kk) at a[r * a_rs + (kk / 2) * a_ps + kk % 2] (a_ps = 2:
// rows of A contiguous along K); B is packed in pairs, element (kk, lane) at
// b[((kk / 2) * ld + lane) * 2 + kk % 2]. kAcc: C += A . B, C first multiplied lane-wise by
// col_scale[col..] when that is given.
template <int MR, int NV, bool kAcc>
inline void gemm_bf16_tile(const uint16_t* a, int64_t a_rs, int64_t a_ps, const uint16_t* b, int64_t ld, int64_t K,
                           float* c, int64_t c_ld, int64_t col, const float* col_scale) {
  __m512 acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const __m512 sv = col_scale ? _mm512_loadu_ps(col_scale + col + v * 16) : _mm512_set1_ps(1.0f);
    for (int r = 0; r < MR; ++r)
      acc[r][v] = kAcc ? _mm512_mul_ps(_mm512_loadu_ps(c + r * c_ld + col + v * 16), sv) : _mm512_setzero_ps();
  }
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(b + ((kp * ld + col + v * 16) * 2));
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, a + r * a_rs + kp * a_ps, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * c_ld + col + v * 16, acc[r][v]);
}

template <int MR, bool kAcc>
inline void gemm_bf16_rows(int m, const uint16_t* a, int64_t a_rs, int64_t a_ps, const uint16_t* b, int64_t ld,
                           int64_t K, float* c, int64_t c_ld, int64_t lanes, const float* col_scale) {
  if constexpr (MR > 0) {
    if (m != MR) return gemm_bf16_rows<MR - 1, kAcc>(m, a, a_rs, a_ps, b, ld, K, c, c_ld, lanes, col_scale);
    int64_t col = 0;
    for (; col + 32 <= lanes; col += 32)
      gemm_bf16_tile<MR, 2, kAcc>(a, a_rs, a_ps, b, ld, K, c, c_ld, col, col_scale);
    if (col < lanes) gemm_bf16_tile<MR, 1, kAcc>(a, a_rs, a_ps, b, ld, K, c, c_ld, col, col_scale);
  }
}

// C[m][lanes] = A . B (kAcc: C += A . B) as above, in groups of Avx512::kRows rows of C;
// lanes a multiple of 16.
template <class Isa, bool kAcc>
void gemm_bf16(int64_t m, int64_t lanes, int64_t K, const uint16_t* a, int64_t a_rs, const uint16_t* b, int64_t ld,
               float* c, int64_t c_ld, int64_t a_ps, const float* col_scale) {
  constexpr int MR = Avx512::kRows;
  for (int64_t r = 0; r < m; r += MR)
    gemm_bf16_rows<MR, kAcc>(int(std::min<int64_t>(MR, m - r)), a + r * a_rs, a_rs, a_ps, b, ld, K, c + r * c_ld,
                             c_ld, lanes, col_scale);
}

// vpermw indices that interleave two sources: element i of the result is element
// first + i / 2 of the first source for even i, of the second (its elements numbered from
// `second`) for odd i.
inline __m512i interleave_index(int second, int first) {
  alignas(64) uint16_t idx[32];
  for (int i = 0; i < 32; ++i) idx[i] = uint16_t((i & 1) * second + first + i / 2);
  return _mm512_load_si512(idx);
}

// A B operand of gemm_bf16 from fp32 rows, pairs along the rows: dst[((j / 2) * ld + x) * 2 +
// j % 2] = src[j][x] rounded to bf16 (nearest even) for j < n (0 for the pad row of an odd
// n), x < lanes (a multiple of 16); src rows with stride ld.
template <class Isa>
void round_row_pairs_bf16(const float* src, int64_t n, int64_t ld, int64_t lanes, uint16_t* dst) {
  static const __m512i idx = interleave_index(16, 0);  // row j's x in 0-15, row j + 1's in 16-31
  for (int64_t j = 0; j < n; j += 2) {
    const float* r0 = src + j * ld;
    for (int64_t x = 0; x < lanes; x += 16) {
      const __m512 a = _mm512_loadu_ps(r0 + x);
      const __m512 b = j + 1 < n ? _mm512_loadu_ps(r0 + ld + x) : _mm512_setzero_ps();
      const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // bf16(a) in elements 0-15, bf16(b) in 16-31
      _mm512_storeu_si512(dst + ((j / 2) * ld + x) * 2, _mm512_permutexvar_epi16(idx, h));
    }
  }
}

// Two raw bf16 rows interleaved: out[x * 2] = r0[x], out[x * 2 + 1] = r1[x] (0 when r1 is
// null: the pad row of an odd count) for x < width, zeros for width <= x < width_p (a
// multiple of 16).
template <class Isa>
void pair_rows_bf16(const uint16_t* r0, const uint16_t* r1, int64_t width, int64_t width_p, uint16_t* out) {
  static const __m512i idx_lo = interleave_index(32, 0);  // x 0-15 of a 32-wide chunk
  static const __m512i idx_hi = interleave_index(32, 16);  // x 16-31
  for (int64_t x = 0; x < width_p; x += 32) {
    const int64_t w = std::min<int64_t>(32, width - x);
    const __mmask32 keep = w >= 32 ? __mmask32(0xffffffffu) : w <= 0 ? __mmask32(0) : __mmask32((1u << w) - 1);
    const __m512i a = _mm512_maskz_loadu_epi16(keep, r0 + x);
    const __m512i b = r1 ? _mm512_maskz_loadu_epi16(keep, r1 + x) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + x * 2, _mm512_permutex2var_epi16(a, idx_lo, b));
    if (width_p - x > 16) _mm512_storeu_si512(out + x * 2 + 32, _mm512_permutex2var_epi16(a, idx_hi, b));
  }
}

// Strided raw bf16 rows in pairs of rows: dst[((j / 2) * width_p + x) * 2 + j % 2] =
// src[j * src_rs + x] for j < n, x < width; zeros for the pad row of an odd n and for
// width <= x < width_p.
template <class Isa>
void row_pairs_bf16(const uint16_t* src, int64_t src_rs, int64_t n, int64_t width, int64_t width_p, uint16_t* dst) {
  for (int64_t j = 0; j < n; j += 2)
    pair_rows_bf16<Isa>(src + j * src_rs, j + 1 < n ? src + (j + 1) * src_rs : nullptr, width, width_p,
                        dst + (j / 2) * width_p * 2);
}

// dst[r][x] = src[r][x] rounded to bf16 (nearest even) for x < k, 0 for k <= x < round_up(k, 2),
// m rows, both with row stride ld (elements): an A operand of gemm_bf16 whose pairs run along x.
template <class Isa>
void round_rows_bf16(const float* src, int64_t m, int64_t k, int64_t ld, uint16_t* dst) {
  const int64_t k2 = (k + 1) / 2 * 2;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t x = 0; x < k2; x += 16) {
      const int64_t n = std::min<int64_t>(16, k - x);  // <= 0 only for the pad column
      const __mmask16 keep = n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(keep, src + r * ld + x);
      const __m256bh h = _mm512_cvtneps_pbh(v);
      const int64_t w = std::min<int64_t>(16, k2 - x);
      _mm256_mask_storeu_epi16(dst + r * ld + x, __mmask16((1u << w) - 1), (__m256i)h);
    }
  }
}
#endif

}  // namespace
}  // namespace steelattn::cpu
