// Thin SIMD wrappers for the CPU flash kernel. The kernel is written once as a
// template over one of these structs; each instantiation lives in its own
// translation unit compiled for its instruction set, and the dispatcher picks
// one at run time (so the library also runs on AVX2-only or non-x86 CPUs).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace steelattn::cpu {
namespace {  // internal linkage: each ISA translation unit keeps its own copy

// Scalar conversions used where throughput does not matter (Q packing, output).
inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN kept NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; --exp; }
      u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_f16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (au > 0x7f800000u ? 0x200u : 0));
  if (au >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow to inf
  if (au < 0x38800000u) {                                  // subnormal or zero in f16
    if (au < 0x33000000u) return sign;
    const uint32_t man = (au & 0x7fffffu) | 0x800000u;
    const int shift = 126 - int(au >> 23);  // 14..24: value = man * 2^(E - 150), f16 unit 2^-24
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = au + 0xfffu + ((au >> 13) & 1u) - (112u << 23);
  return uint16_t(sign | (r >> 13));
}

// exp2 on [-inf, 0] to ~1e-7 relative: split x = n + f, f in [-0.5, 0.5],
// 2^f by its degree-6 Taylor polynomial (error < 1.3e-7), 2^n via the exponent.
constexpr float kExp2Coef[7] = {1.0f,          0.693147181f,  0.240226507f,  0.0555041087f,
                                0.00961812911f, 0.00133335581f, 0.000154035304f};

// Portable path, also the float64 path (gradcheck and float64 users).
template <class TT>
struct ScalarT {
  using T = TT;                    // element type of every buffer
  static constexpr int W = 1;      // lanes
  static constexpr int kRows = 4;  // rows of C per micro-tile (tiles.h)
  static constexpr bool kBf16Dot = false;  // bf16 pair dot products (vdpbf16ps) available
  using V = TT;
  static V load(const T* p) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V set1(T x) { return x; }
  static V zero() { return T(0); }
  static V fma(V a, V b, V c) { return a * b + c; }
  static T fma1(T a, T b, T c) { return a * b + c; }  // one element, rounded as fma rounds
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V exp2(V x) { return std::exp2(x); }
  static T hsum(V a) { return a; }
  static V load_bf16(const uint16_t* s) { return T(bf16_to_float(*s)); }  // W elements, converted
  static V load_f16(const uint16_t* s) { return T(f16_to_float(*s)); }
  static void load_bf16_row(const uint16_t* s, T* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_float(s[i]);
  }
  static void load_f16_row(const uint16_t* s, T* d, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = f16_to_float(s[i]);
  }
};
using Scalar = ScalarT<float>;
using Scalar64 = ScalarT<double>;

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Avx2 {
  using T = float;
  static constexpr int W = 8;
  static constexpr int kRows = 6;  // 6x2 accumulators + 2 B vectors + 1 broadcast = 15 ymm
  static constexpr bool kBf16Dot = false;
  using V = __m256;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float fma1(float a, float b, float c) { return std::fma(a, b, c); }  // one element, fused as fma
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V exp2(V x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));  // -inf and underflow -> exponent 0 -> 0.0
    const V n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm256_sub_ps(x, n);
    V p = _mm256_set1_ps(kExp2Coef[6]);
    for (int c = 5; c >= 0; --c) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Coef[c]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    // n = -127 gives a zero exponent field, so 2^n is exactly 0 (masked scores vanish).
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static float hsum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static V load_bf16(const uint16_t* s) {  // W elements, converted
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load_f16(const uint16_t* s) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s))); }
  static void load_bf16_row(const uint16_t* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, load_bf16(s + i));
    for (; i < n; ++i) d[i] = bf16_to_float(s[i]);
  }
  static void load_f16_row(const uint16_t* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, load_f16(s + i));
    for (; i < n; ++i) d[i] = f16_to_float(s[i]);
  }
};
#endif

#if defined(__AVX512F__)
struct Avx512 {
  using T = float;
  static constexpr int W = 16;
  static constexpr int kRows = 12;  // 12x2 accumulators + 2 B vectors + 1 broadcast = 27 zmm
  static constexpr bool kBf16Dot = false;
  using V = __m512;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float fma1(float a, float b, float c) { return std::fma(a, b, c); }  // one element, fused as fma
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V exp2(V x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-200.0f));  // keeps f finite for -inf; scalef underflows to 0
    const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(x, n);
    V p = _mm512_set1_ps(kExp2Coef[6]);
    for (int c = 5; c >= 0; --c) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Coef[c]));
    return _mm512_scalef_ps(p, n);
  }
  static float hsum(V a) { return _mm512_reduce_add_ps(a); }
  static V load_bf16(const uint16_t* s) {  // W elements, converted
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load_f16(const uint16_t* s) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  }
  static void load_bf16_row(const uint16_t* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, load_bf16(s + i));
    for (; i < n; ++i) d[i] = bf16_to_float(s[i]);
  }
  static void load_f16_row(const uint16_t* s, float* d, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, load_f16(s + i));
    for (; i < n; ++i) d[i] = f16_to_float(s[i]);
  }
};

#if defined(__AVX512BF16__)
// AVX-512 plus vdpbf16ps: Q.K^T of bf16 inputs in bf16 pairs (exact products, fp32 sums).
struct Avx512Bf16 : Avx512 {
  static constexpr bool kBf16Dot = true;
};
#endif
#endif

}  // namespace
}  // namespace steelattn::cpu
