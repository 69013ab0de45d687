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

// bf16 pair product (defined below where the instruction set has vdpbf16ps; the
// kernels call it only under `if constexpr (Isa::kBf16Dot)`).
template <class Isa>
void gemm_bf16(int64_t m, int64_t lanes, int64_t K, const uint16_t* a, int64_t a_rs, const uint16_t* b, int64_t ld,
               float* c, int64_t c_ld);

#if defined(__AVX512BF16__)
// C[m][lanes] = A[m][K] . B[K][lanes] for bf16 A and B, K even, with vdpbf16ps: A rows
// hold bf16 pairs along K contiguously (element (r, kk) at a[r * a_rs + kk]); B is packed
// in pairs, element (kk, lane) at b[((kk / 2) * ld + lane) * 2 + kk % 2].
template <int MR, int NV>
inline void gemm_bf16_tile(const uint16_t* a, int64_t a_rs, const uint16_t* b, int64_t ld, int64_t K, float* c,
                           int64_t c_ld, int64_t col) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K / 2; ++kp) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(b + ((kp * ld + col + v * 16) * 2));
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, a + r * a_rs + 2 * kp, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * c_ld + col + v * 16, acc[r][v]);
}

template <int MR>
inline void gemm_bf16_rows(int m, const uint16_t* a, int64_t a_rs, const uint16_t* b, int64_t ld, int64_t K,
                           float* c, int64_t c_ld, int64_t lanes) {
  if constexpr (MR > 0) {
    if (m != MR) return gemm_bf16_rows<MR - 1>(m, a, a_rs, b, ld, K, c, c_ld, lanes);
    int64_t col = 0;
    for (; col + 32 <= lanes; col += 32) gemm_bf16_tile<MR, 2>(a, a_rs, b, ld, K, c, c_ld, col);
    if (col < lanes) gemm_bf16_tile<MR, 1>(a, a_rs, b, ld, K, c, c_ld, col);
  }
}

// C[m][lanes] = A . B as above, in groups of Avx512::kRows rows of C.
template <class Isa>
void gemm_bf16(int64_t m, int64_t lanes, int64_t K, const uint16_t* a, int64_t a_rs, const uint16_t* b, int64_t ld,
               float* c, int64_t c_ld) {
  constexpr int MR = Avx512::kRows;
  for (int64_t r = 0; r < m; r += MR)
    gemm_bf16_rows<MR>(int(std::min<int64_t>(MR, m - r)), a + r * a_rs, a_rs, b, ld, K, c + r * c_ld, c_ld, lanes);
}
#endif

}  // namespace
}  // namespace steelattn::cpu
