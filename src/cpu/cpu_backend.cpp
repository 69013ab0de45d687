// Picks the CPU kernel's instruction set once, at run time.
#include <cstdlib>
#include <cstring>

#include "core/backends.h"
#include "cpu/flash.h"

namespace steelattn {

CpuIsa detect_cpu_isa() {
  static const CpuIsa isa = [] {
    // STEELATTN_CPU_ISA=avx2|scalar forces a narrower path (testing, old CPUs).
    const char* force = std::getenv("STEELATTN_CPU_ISA");
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (force && std::strcmp(force, "scalar") == 0) return CpuIsa::scalar;
    if (force && std::strcmp(force, "avx2") == 0 && avx2) return CpuIsa::avx2;
    if (avx512) return CpuIsa::avx512;
    if (avx2) return CpuIsa::avx2;
#endif
    (void)force;
    return CpuIsa::scalar;
  }();
  return isa;
}

#if defined(STEELATTN_HAVE_AVX512BF16)
// AVX512-BF16 (vdpbf16ps) for bf16 inputs' products (flash_avx512bf16.cpp): on by default
// where the CPU has it; STEELATTN_CPU_BF16_DOT=0 turns it off (tests compare both).
bool use_bf16_dot(const AttentionParams& p) {
  static const bool available = [] {
    const char* env = std::getenv("STEELATTN_CPU_BF16_DOT");
    return !(env && env[0] == '0') && __builtin_cpu_supports("avx512bf16");
  }();
  return available && p.q.dtype == DType::bf16 && p.k.dtype == DType::bf16 && p.D % 2 == 0;
}
#endif

namespace {

using Entry = Status (*)(const AttentionParams*, int64_t);

// One backward entry call: the dense problem, or a ragged call's parts (split_sequences).
Status run_cpu(const AttentionParams& p, Entry entry) {
  if (!p.ragged()) return entry(&p, 1);
  const std::vector<AttentionParams> seqs = cpu::split_sequences(p);
  return entry(seqs.data(), int64_t(seqs.size()));
}

Entry forward_entry(const AttentionParams& p, CpuIsa isa) {
  if (p.q.dtype == DType::f64) return &cpu::flash_forward_f64;
#if defined(STEELATTN_HAVE_AVX512BF16)
  if (isa == CpuIsa::avx512 && use_bf16_dot(p)) return &cpu::flash_forward_avx512bf16;
#endif
  switch (isa) {
    case CpuIsa::avx512: return &cpu::flash_forward_avx512;
    case CpuIsa::avx2: return &cpu::flash_forward_avx2;
    default: return &cpu::flash_forward_scalar;
  }
}

Entry backward_entry(const AttentionParams& p, CpuIsa isa) {
  if (p.q.dtype == DType::f64) return &cpu::flash_backward_f64;
#if defined(STEELATTN_HAVE_AVX512BF16)
  if (isa == CpuIsa::avx512 && use_bf16_dot(p)) return &cpu::flash_backward_avx512bf16;
#endif
  switch (isa) {
    case CpuIsa::avx512: return &cpu::flash_backward_avx512;
    case CpuIsa::avx2: return &cpu::flash_backward_avx2;
    default: return &cpu::flash_backward_scalar;
  }
}

}  // namespace

Status cpu_forward(const AttentionParams& p, CpuIsa isa) {
  const Entry entry = forward_entry(p, isa);
  const std::vector<AttentionParams> parts = p.ragged() ? cpu::split_sequences(p) : std::vector<AttentionParams>{p};
  // Calls with fewer tasks than threads (decode) also split over keys (split_keys.cpp).
  if (const int splits = cpu::key_splits(parts); splits > 1) return cpu::forward_with_key_splits(parts, splits, entry);
  return entry(parts.data(), int64_t(parts.size()));
}

Status cpu_backward(const AttentionParams& p, CpuIsa isa) { return run_cpu(p, backward_entry(p, isa)); }

const char* cpu_isa() {
  switch (detect_cpu_isa()) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace steelattn
