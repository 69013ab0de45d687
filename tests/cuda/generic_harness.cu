// Standalone correctness harness for the generic CUDA forward kernels
// (src/cuda/generic). No torch, no core library: it fills AttentionParams by
// hand (as validate_forward would), calls cuda_generic_forward, and compares
// against a float64 reference computed here from the definition.
//
// Build (on a machine with a GPU):
//   nvcc -std=c++17 -O3 -Iinclude -Isrc -DSTEELATTN_WITH_CUDA \
//     -gencode=arch=compute_90a,code=sm_90a src/cuda/generic/*.cu \
//     tests/cuda/generic_harness.cu -o generic_harness
//   ./generic_harness            all cases
//   ./generic_harness --small    a few small cases (for compute-sanitizer)
//
// Checks per case: out, lse, attn_weights against the reference (norm-relative
// error; fp32 < 1e-5, fp16/bf16 < 1e-2), every output element written (outputs
// are poisoned with NaN first), row padding of `out` left untouched, and a
// fully masked row giving zeros with lse = -inf. Last line: "N passed, M failed".
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/backends.h"
#include "steelattn/detail/philox.h"
#include "steelattn/steelattn.h"

using namespace steelattn;

namespace {

#define CUDA_CHECK(x)                                                                    \
  do {                                                                                   \
    cudaError_t e_ = (x);                                                                \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, \
                   __LINE__);                                                            \
      std::exit(2);                                                                      \
    }                                                                                    \
  } while (0)

int elem_size(DType t) { return t == DType::f32 ? 4 : 2; }
const char* dname(DType t) { return t == DType::f32 ? "f32" : t == DType::f16 ? "f16" : "bf16"; }

// Stores `x` as dtype `t` at `p` and returns the value actually stored.
double store_elem(DType t, void* p, double x) {
  if (t == DType::f32) {
    const float f = float(x);
    std::memcpy(p, &f, 4);
    return f;
  }
  if (t == DType::f16) {
    const __half h = __float2half_rn(float(x));
    std::memcpy(p, &h, 2);
    return __half2float(h);
  }
  const __nv_bfloat16 h = __float2bfloat16_rn(float(x));
  std::memcpy(p, &h, 2);
  return __bfloat162float(h);
}

double load_elem(DType t, const void* p) {
  if (t == DType::f32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  if (t == DType::f16) {
    __half h;
    std::memcpy(&h, p, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, p, 2);
  return __bfloat162float(h);
}

// A 4-d strided tensor with host and device copies of its storage.
struct Tensor {
  DType dt = DType::f32;
  int ndim = 4;
  int64_t shape[4] = {1, 1, 1, 1};
  int64_t stride[4] = {0, 0, 0, 0};
  std::vector<unsigned char> host;
  void* dev = nullptr;
  int64_t elem_offset = 0;  // view starts this many elements into the storage

  int64_t off(int64_t a, int64_t b, int64_t c, int64_t d) const {
    return elem_offset + a * stride[0] + b * stride[1] + c * stride[2] + d * stride[3];
  }
  void* at(int64_t a, int64_t b, int64_t c, int64_t d) {
    return host.data() + off(a, b, c, d) * elem_size(dt);
  }
  double get(int64_t a, int64_t b, int64_t c, int64_t d) const {
    return load_elem(dt, host.data() + off(a, b, c, d) * elem_size(dt));
  }
  TensorRef ref() const {
    TensorRef r;
    r.data = static_cast<unsigned char*>(dev) + elem_offset * elem_size(dt);
    r.dtype = dt;
    r.device = Device::cuda;
    r.ndim = ndim;
    for (int i = 0; i < 4; ++i) r.shape[i] = shape[i], r.stride[i] = stride[i];
    return r;
  }
  void upload() {
    CUDA_CHECK(cudaMalloc(&dev, host.size()));
    CUDA_CHECK(cudaMemcpy(dev, host.data(), host.size(), cudaMemcpyHostToDevice));
  }
  void download() { CUDA_CHECK(cudaMemcpy(host.data(), dev, host.size(), cudaMemcpyDeviceToHost)); }
  void release() {
    if (dev) cudaFree(dev);
    dev = nullptr;
  }
};

// [B, Hh, L, Dd] view of either [B, Hh, L, Dd + pad] or [B, L, Hh, Dd + pad]
// storage (the latter is what a projection produces). `misalign` shifts the
// view by one element so rows are not 16-byte aligned.
Tensor make_bhld(DType dt, int64_t B, int64_t Hh, int64_t L, int64_t Dd, bool bnhd, int pad,
                 bool misalign) {
  Tensor t;
  t.dt = dt;
  const int64_t row = Dd + pad;
  t.shape[0] = B, t.shape[1] = Hh, t.shape[2] = L, t.shape[3] = Dd;
  if (bnhd) {
    t.stride[0] = L * Hh * row, t.stride[1] = row, t.stride[2] = Hh * row;
  } else {
    t.stride[0] = Hh * L * row, t.stride[1] = L * row, t.stride[2] = row;
  }
  t.stride[3] = 1;
  t.elem_offset = misalign ? 1 : 0;
  t.host.resize(size_t(B * Hh * L * row + t.elem_offset) * elem_size(dt));
  return t;
}

void fill_random(Tensor& t, std::mt19937_64& rng, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  const size_t n = t.host.size() / elem_size(t.dt);
  for (size_t i = 0; i < n; ++i) store_elem(t.dt, t.host.data() + i * elem_size(t.dt), u(rng));
}

void poison(Tensor& t) { std::memset(t.host.data(), 0xFF, t.host.size()); }  // NaN in all dtypes

struct Case {
  std::string name;
  DType dt = DType::f16;
  int64_t B = 1, H = 2, Hkv = 2, N = 17, S = 17, D = 64, Dv = 64;
  bool bnhd = false;      // q/k/v/out stored [B, N, H, D]
  int pad = 0;            // extra elements at the end of every row
  bool misalign = false;  // views start one element into their storage
  int64_t diag = 0, wl = -1, wr = -1;
  float softcap = 0.0f;
  float scale = 0.0f;  // 0: 1/sqrt(D)
  int alibi = 0;       // 0 off, 1 [H] broadcast over B (stride 0), 2 [B, H]
  int bias = 0;        // 0 off, 1 full [B,H,N,S], 2 [N,S] broadcast, 3 [B,1,1,S] broadcast
  int mask = 0;        // 0 off, 1 full random, 2 [B,1,N,S] random, 3 full + masked rows
  float dropout = 0.0f;
  bool lse = true;
  bool attn = false;
  bool lse_strided = false;  // lse stored [B, N, H]
  bool force_simt = false;   // 16-bit inputs through the SIMT kernel (small-smem route)
};

struct Inputs {
  Tensor q, k, v, out, lse, attn, alibi, bias, mask;
};

// Builds inputs for a case and fills AttentionParams as validate_forward would.
AttentionParams build(const Case& c, Inputs& in, std::mt19937_64& rng) {
  in.q = make_bhld(c.dt, c.B, c.H, c.N, c.D, c.bnhd, c.pad, c.misalign);
  in.k = make_bhld(c.dt, c.B, c.Hkv, c.S, c.D, c.bnhd, c.pad, c.misalign);
  in.v = make_bhld(c.dt, c.B, c.Hkv, c.S, c.Dv, c.bnhd, c.pad, c.misalign);
  in.out = make_bhld(c.dt, c.B, c.H, c.N, c.Dv, c.bnhd, c.pad == 0 ? 3 : c.pad, false);
  fill_random(in.q, rng, -1.0, 1.0);
  fill_random(in.k, rng, -1.0, 1.0);
  fill_random(in.v, rng, -1.0, 1.0);
  poison(in.out);

  AttentionParams p;
  p.B = c.B, p.H = c.H, p.Hkv = c.Hkv, p.N = c.N, p.S = c.S, p.D = c.D, p.Dv = c.Dv;
  p.scale = c.scale > 0.0f ? c.scale : float(1.0 / std::sqrt(double(c.D)));
  p.softcap = c.softcap;
  p.diag_offset = c.diag, p.window_left = c.wl, p.window_right = c.wr;
  p.dropout_p = c.dropout;
  p.dropout_seed = 0x1234567887654321ull + rng() % 1000;
  p.dropout_offset = rng() % 100000;

  if (c.lse) {
    in.lse.dt = DType::f32;
    in.lse.ndim = 3;
    in.lse.shape[0] = c.B, in.lse.shape[1] = c.H, in.lse.shape[2] = c.N;
    if (c.lse_strided) {
      in.lse.stride[0] = c.N * c.H, in.lse.stride[1] = 1, in.lse.stride[2] = c.H;
    } else {
      in.lse.stride[0] = c.H * c.N, in.lse.stride[1] = c.N, in.lse.stride[2] = 1;
    }
    in.lse.host.resize(size_t(c.B * c.H * c.N) * 4);
    poison(in.lse);
  }
  if (c.attn) {
    in.attn.dt = DType::f32;
    in.attn.shape[0] = c.B, in.attn.shape[1] = c.H, in.attn.shape[2] = c.N,
    in.attn.shape[3] = c.S;
    in.attn.stride[3] = 1, in.attn.stride[2] = c.S, in.attn.stride[1] = c.N * c.S,
    in.attn.stride[0] = c.H * c.N * c.S;
    in.attn.host.resize(size_t(c.B * c.H * c.N * c.S) * 4);
    poison(in.attn);
  }
  if (c.alibi) {
    in.alibi.dt = DType::f32;
    in.alibi.ndim = 2;
    in.alibi.shape[0] = c.B, in.alibi.shape[1] = c.H;
    in.alibi.stride[0] = c.alibi == 1 ? 0 : c.H, in.alibi.stride[1] = 1;
    in.alibi.host.resize(size_t(c.alibi == 1 ? c.H : c.B * c.H) * 4);
    fill_random(in.alibi, rng, 0.01, 0.5);
  }
  if (c.bias) {
    in.bias.dt = DType::f32;
    in.bias.shape[0] = c.B, in.bias.shape[1] = c.H, in.bias.shape[2] = c.N, in.bias.shape[3] = c.S;
    int64_t n = 0;
    if (c.bias == 1) {
      in.bias.stride[0] = c.H * c.N * c.S, in.bias.stride[1] = c.N * c.S;
      in.bias.stride[2] = c.S, in.bias.stride[3] = 1, n = c.B * c.H * c.N * c.S;
    } else if (c.bias == 2) {
      in.bias.stride[0] = 0, in.bias.stride[1] = 0, in.bias.stride[2] = c.S, in.bias.stride[3] = 1;
      n = c.N * c.S;
    } else {
      in.bias.stride[0] = c.S, in.bias.stride[1] = 0, in.bias.stride[2] = 0, in.bias.stride[3] = 1;
      n = c.B * c.S;
    }
    in.bias.host.resize(size_t(n) * 4);
    fill_random(in.bias, rng, -2.0, 2.0);
  }
  if (c.mask) {
    in.mask.dt = DType::boolean;
    in.mask.shape[0] = c.B, in.mask.shape[1] = c.H, in.mask.shape[2] = c.N, in.mask.shape[3] = c.S;
    int64_t n;
    if (c.mask == 2) {
      in.mask.stride[0] = c.N * c.S, in.mask.stride[1] = 0, in.mask.stride[2] = c.S;
      n = c.B * c.N * c.S;
    } else {
      in.mask.stride[0] = c.H * c.N * c.S, in.mask.stride[1] = c.N * c.S, in.mask.stride[2] = c.S;
      n = c.B * c.H * c.N * c.S;
    }
    in.mask.stride[3] = 1;
    in.mask.host.resize(size_t(n));
    std::bernoulli_distribution keep(0.7);
    for (auto& m : in.mask.host) m = keep(rng) ? 1 : 0;
    if (c.mask == 3)  // every third query row of (b=0, h=0) sees nothing
      for (int64_t i = 0; i < c.N; i += 3)
        for (int64_t j = 0; j < c.S; ++j) in.mask.host[size_t(i * c.S + j)] = 0;
  }

  for (Tensor* t : {&in.q, &in.k, &in.v, &in.out, &in.lse, &in.attn, &in.alibi, &in.bias,
                    &in.mask})
    if (!t->host.empty()) t->upload();
  // TensorRefs carry device pointers, so they are taken after the uploads.
  p.q = in.q.ref();
  p.k = in.k.ref();
  p.v = in.v.ref();
  p.out = in.out.ref();
  if (c.lse) p.lse = in.lse.ref();
  if (c.attn) p.attn_weights = in.attn.ref();
  if (c.alibi) p.alibi_slopes = in.alibi.ref();
  if (c.bias) p.bias = in.bias.ref();
  if (c.mask) p.bool_mask = in.mask.ref();
  return p;
}

// float64 reference outputs: out [B,H,N,Dv], lse [B,H,N], attn [B,H,N,S].
struct Ref {
  std::vector<double> out, lse, attn;
};

Ref reference(const Case& c, const AttentionParams& p, const Inputs& in) {
  Ref r;
  r.out.assign(size_t(c.B * c.H * c.N * c.Dv), 0.0);
  r.lse.assign(size_t(c.B * c.H * c.N), 0.0);
  r.attn.assign(c.attn ? size_t(c.B * c.H * c.N * c.S) : 0, 0.0);
  const uint32_t thr = detail::dropout_threshold24(c.dropout);
  auto work = [&](int64_t bh) {
    const int64_t b = bh / c.H, h = bh % c.H, hk = h / (c.H / c.Hkv);
    std::vector<double> s(size_t(c.S));
    for (int64_t i = 0; i < c.N; ++i) {
      double mx = -INFINITY;
      for (int64_t j = 0; j < c.S; ++j) {
        const int64_t a = i + c.diag;
        bool vis = (c.wl < 0 || j >= a - c.wl) && (c.wr < 0 || j <= a + c.wr);
        if (c.mask) {
          const auto& m = in.mask;
          vis = vis && m.host[size_t(b * m.stride[0] + h * m.stride[1] + i * m.stride[2] + j)] != 0;
        }
        if (!vis) {
          s[j] = -INFINITY;
          continue;
        }
        double dot = 0;
        for (int64_t d = 0; d < c.D; ++d) dot += in.q.get(b, h, i, d) * in.k.get(b, hk, j, d);
        double x = dot * double(p.scale);
        if (c.softcap > 0) x = c.softcap * std::tanh(x / c.softcap);
        if (c.alibi) x -= in.alibi.get(b, h, 0, 0) * double(std::llabs(a - j));
        if (c.bias) x += in.bias.get(b, h, i, j);
        s[j] = x;
        mx = std::max(mx, x);
      }
      const int64_t row = (b * c.H + h) * c.N + i;
      if (mx == -INFINITY) {
        r.lse[row] = -INFINITY;
        continue;  // out and attn stay 0
      }
      double sum = 0;
      for (int64_t j = 0; j < c.S; ++j) sum += s[j] == -INFINITY ? 0.0 : std::exp(s[j] - mx);
      r.lse[row] = mx + std::log(sum);
      for (int64_t j = 0; j < c.S; ++j) {
        if (s[j] == -INFINITY) continue;
        double pr = std::exp(s[j] - mx) / sum;
        if (c.attn) r.attn[size_t(row * c.S + j)] = pr;
        if (c.dropout > 0) {
          const uint64_t idx = detail::dropout_index(b, h, i, j, c.H, c.N, c.S);
          pr = detail::dropout_keep(idx, p.dropout_seed, p.dropout_offset, thr)
                   ? pr / (1.0 - double(c.dropout))
                   : 0.0;
        }
        if (pr == 0.0) continue;
        for (int64_t d = 0; d < c.Dv; ++d)
          r.out[size_t(row * c.Dv + d)] += pr * in.v.get(b, hk, j, d);
      }
    }
  };
  const int64_t BH = c.B * c.H;
  const int nt = int(std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t)
    pool.emplace_back([&, t] {
      for (int64_t bh = t; bh < BH; bh += nt) work(bh);
    });
  for (auto& t : pool) t.join();
  return r;
}

// Norm-relative error of `got` vs `want`; NaN anywhere counts as failure.
struct Err {
  double sq_diff = 0, sq_ref = 0;
  bool nan = false;
  void add(double got, double want) {
    if (std::isnan(got)) nan = true;
    sq_diff += (got - want) * (got - want);
    sq_ref += want * want;
  }
  double rel() const { return nan ? INFINITY : std::sqrt(sq_diff) / std::max(std::sqrt(sq_ref), 1e-30); }
};

bool run_case(const Case& c, std::mt19937_64& rng, int index) {
  Inputs in;
  AttentionParams p = build(c, in, rng);
  std::string why;
  bool ok = true;
  std::string detail_msg;
  if (!cuda_generic_supports(p, &why)) {
    std::printf("FAIL [#%d] %-48s not supported: %s\n", index, c.name.c_str(), why.c_str());
    return false;
  }
  setenv("STEELATTN_GENERIC_FORCE_SIMT", c.force_simt ? "1" : "0", 1);
  const Status st = cuda_generic_forward(p, nullptr);
  const cudaError_t sync = cudaDeviceSynchronize();
  if (!st.ok() || sync != cudaSuccess) {
    std::printf("FAIL [#%d] %-48s status '%s' sync '%s'\n", index, c.name.c_str(),
                st.message.c_str(), cudaGetErrorString(sync));
    // The context is gone: exit 3 so a driver script can go on with --from index+1.
    if (sync != cudaSuccess) std::exit(3);
    return false;
  }
  in.out.download();
  if (c.lse) in.lse.download();
  if (c.attn) in.attn.download();
  const Ref r = reference(c, p, in);

  const double tol = c.dt == DType::f32 ? 1e-5 : 1e-2;
  Err eo, ea;
  double lse_err = 0;
  bool lse_bad = false, pad_bad = false;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t i = 0; i < c.N; ++i) {
        const int64_t row = (b * c.H + h) * c.N + i;
        for (int64_t d = 0; d < c.Dv; ++d) eo.add(in.out.get(b, h, i, d), r.out[size_t(row * c.Dv + d)]);
        // Row padding of `out` must still hold the poison bytes.
        const unsigned char* pad_bytes = static_cast<unsigned char*>(in.out.at(b, h, i, c.Dv));
        const int pad = c.pad == 0 ? 3 : c.pad;
        for (int e = 0; e < pad * elem_size(c.dt); ++e) pad_bad |= pad_bytes[e] != 0xFF;
        if (c.lse) {
          const double got = in.lse.get(b, h, i, 0), want = r.lse[size_t(row)];
          if (std::isinf(want) || std::isinf(got) || std::isnan(got)) {
            lse_bad |= !(got == want);
          } else {
            lse_err = std::max(lse_err, std::abs(got - want) / std::max(1.0, std::abs(want)));
          }
        }
        if (c.attn)
          for (int64_t j = 0; j < c.S; ++j) ea.add(in.attn.get(b, h, i, j), r.attn[size_t(row * c.S + j)]);
      }
  // fp32 lse: 1e-5 relative; 16-bit: scores carry input rounding, 1e-2.
  char buf[256];
  std::snprintf(buf, sizeof buf, "out %.2e lse %.2e%s attn %.2e", eo.rel(), lse_err,
                lse_bad ? "(inf mismatch)" : "", c.attn ? ea.rel() : 0.0);
  detail_msg = buf;
  if (!(eo.rel() < tol) || lse_bad || !(lse_err < tol) || (c.attn && !(ea.rel() < tol)) || pad_bad)
    ok = false;
  if (pad_bad) detail_msg += " [out row padding overwritten]";
  std::printf("%s [#%d] %-48s %s\n", ok ? "ok  " : "FAIL", index, c.name.c_str(),
              detail_msg.c_str());
  std::fflush(stdout);
  for (Tensor* t : {&in.q, &in.k, &in.v, &in.out, &in.lse, &in.attn, &in.alibi, &in.bias, &in.mask})
    t->release();
  return ok;
}

std::string shape_name(const Case& c) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s B%lld H%lld/%lld N%lld S%lld D%lld/%lld", dname(c.dt),
                (long long)c.B, (long long)c.H, (long long)c.Hkv, (long long)c.N, (long long)c.S,
                (long long)c.D, (long long)c.Dv);
  return buf;
}

std::vector<Case> all_cases(bool small) {
  std::vector<Case> cs;
  const DType dts[] = {DType::f32, DType::f16, DType::bf16};
  auto add = [&](Case c, const std::string& tag) {
    c.name = shape_name(c) + (tag.empty() ? "" : " " + tag);
    cs.push_back(c);
  };
  if (small) {
    for (DType dt : dts) {
      Case c;
      c.dt = dt, c.N = 17, c.S = 130, c.D = 80, c.Dv = 40, c.H = 4, c.Hkv = 1;
      c.bnhd = true, c.diag = c.S - c.N, c.wr = 0, c.alibi = 1, c.bias = 2, c.mask = 3;
      c.dropout = 0.2f, c.attn = true;
      add(c, "everything");
      Case d = c;
      d.misalign = true, d.pad = 3, d.D = 7, d.Dv = 9;
      add(d, "everything misaligned");
      if (dt != DType::f32) {
        Case e = c;
        e.force_simt = true;
        add(e, "everything forced SIMT");
      }
    }
    return cs;
  }
  // Shapes: N, S in {1, 7, 17, 130, 1000}; D in {32 .. 512}; all dtypes.
  const int64_t lens[][2] = {{1, 1}, {7, 17}, {17, 7}, {130, 1000}, {1000, 130}, {1, 1000}};
  for (DType dt : dts)
    for (int64_t D : {32, 64, 80, 128, 256, 512})
      for (const auto& ns : lens) {
        Case c;
        c.dt = dt, c.N = ns[0], c.S = ns[1], c.D = D, c.Dv = D;
        if (ns[0] * ns[1] * D > 130 * 1000 * 256) c.H = c.Hkv = 1;  // keep the reference quick
        add(c, "");
      }
  for (DType dt : dts) {
    // D != Dv, odd head dims (scalar load path), GQA.
    for (auto dd : {std::pair<int, int>{64, 32}, {32, 128}, {80, 200}, {512, 64}, {96, 512},
                    {17, 5}, {1, 1}, {7, 33}, {512, 512}, {160, 192}}) {
      Case c;
      c.dt = dt, c.N = 130, c.S = 257, c.D = dd.first, c.Dv = dd.second, c.H = 8, c.Hkv = 2;
      add(c, "gqa4 dv!=d");
    }
    Case g;
    g.dt = dt, g.N = 1000, g.S = 1000, g.D = 128, g.Dv = 128, g.H = 4, g.Hkv = 1;
    add(g, "gqa4");
    // Causal bottom-right with N != S (N > S leaves rows with no key), top-left, windows.
    for (auto ns : {std::pair<int, int>{130, 1000}, {1000, 130}, {17, 7}, {7, 17}, {1, 1000}}) {
      Case c;
      c.dt = dt, c.N = ns.first, c.S = ns.second, c.D = 64, c.Dv = 64, c.H = 4, c.Hkv = 2;
      c.diag = c.S - c.N, c.wr = 0;
      add(c, "causal bottom-right");
      c.diag = 0;
      add(c, "causal top-left");
      c.diag = c.S - c.N, c.wl = 100, c.wr = 3;
      add(c, "window (100,3)");
      c.wl = 0, c.wr = -1;
      add(c, "window (0,-1)");
    }
    {
      Case c;
      c.dt = dt, c.N = 1000, c.S = 1000, c.D = 128, c.Dv = 128, c.wl = 64, c.wr = 0;
      c.attn = true;
      add(c, "sliding window 64 + attn_weights");
    }
    // Score modifiers.
    for (int alibi : {1, 2}) {
      Case c;
      c.dt = dt, c.N = 130, c.S = 1000, c.D = 64, c.Dv = 64, c.B = 2, c.H = 4, c.Hkv = 4;
      c.alibi = alibi, c.diag = c.S - c.N, c.wr = 0;
      add(c, alibi == 1 ? "alibi [H] causal" : "alibi [B,H] causal");
    }
    {
      Case c;
      c.dt = dt, c.N = 130, c.S = 130, c.D = 128, c.Dv = 128, c.softcap = 5.0f, c.scale = 0.5f;
      add(c, "softcap 5 scale 0.5");
    }
    for (int bias : {1, 2, 3}) {
      Case c;
      c.dt = dt, c.N = 17, c.S = 130, c.D = 32, c.Dv = 80, c.B = 2, c.H = 4, c.Hkv = 2;
      c.bias = bias;
      add(c, "bias mode " + std::to_string(bias));
    }
    for (int mask : {1, 2, 3}) {
      Case c;
      c.dt = dt, c.N = 130, c.S = 1000, c.D = 64, c.Dv = 64, c.B = 2, c.H = 2, c.Hkv = 1;
      c.mask = mask, c.attn = mask == 3;
      add(c, "bool mask mode " + std::to_string(mask));
    }
    // Dropout (lse and attn_weights stay pre-dropout).
    for (float dp : {0.1f, 0.5f}) {
      Case c;
      c.dt = dt, c.N = 130, c.S = 1000, c.D = 64, c.Dv = 64, c.H = 2, c.Hkv = 2;
      c.dropout = dp, c.attn = true;
      add(c, "dropout " + std::to_string(dp).substr(0, 3) + " + attn_weights");
    }
    // Layouts: [B, N, H, D] storage, padded rows, misaligned views, strided lse.
    {
      Case c;
      c.dt = dt, c.N = 130, c.S = 257, c.D = 64, c.Dv = 128, c.B = 2, c.H = 8, c.Hkv = 2;
      c.bnhd = true, c.lse_strided = true;
      add(c, "bnhd + strided lse");
      c.pad = 8;
      add(c, "bnhd + pad 8");
      c.pad = 3, c.misalign = true;
      add(c, "bnhd + pad 3 + misaligned");
      c.D = 7, c.Dv = 5, c.H = 3, c.Hkv = 3, c.pad = 0, c.misalign = false;
      add(c, "bnhd odd H*D rows");
    }
    // 16-bit inputs through the SIMT kernel (what devices with too little shared
    // memory for the tensor-core tiles run).
    if (dt != DType::f32) {
      Case c;
      c.dt = dt, c.N = 130, c.S = 257, c.D = 512, c.Dv = 300, c.H = 4, c.Hkv = 2;
      c.force_simt = true, c.bnhd = true, c.diag = c.S - c.N, c.wr = 0, c.attn = true;
      c.dropout = 0.1f, c.alibi = 1;
      add(c, "forced SIMT causal dropout alibi");
    }
    // Everything together.
    {
      Case c;
      c.dt = dt, c.N = 1000, c.S = 1000, c.D = 80, c.Dv = 96, c.B = 2, c.H = 4, c.Hkv = 1;
      c.bnhd = true, c.diag = 0, c.wl = 300, c.wr = 0, c.softcap = 20.0f, c.alibi = 2;
      c.bias = 3, c.mask = 3, c.dropout = 0.25f, c.attn = true, c.lse_strided = true;
      add(c, "all features");
    }
  }
  return cs;
}

// --bench: rough forward throughput of the generic path (bf16 / fp32, no anchors;
// the real benchmark lives in bench/). FLOPs = 4 B H N S D, halved for causal.
void bench() {
  std::mt19937_64 rng(7);
  struct B_ {
    DType dt;
    int64_t N, D;
    bool causal;
  };
  for (const B_ bc : {B_{DType::bf16, 4096, 64, false}, B_{DType::bf16, 4096, 128, false},
                      B_{DType::bf16, 4096, 128, true}, B_{DType::bf16, 4096, 256, false},
                      B_{DType::f16, 4096, 128, false}, B_{DType::f32, 4096, 128, false}}) {
    Case c;
    c.dt = bc.dt, c.B = 2, c.H = 16, c.Hkv = 16, c.N = bc.N, c.S = bc.N, c.D = bc.D, c.Dv = bc.D;
    c.lse = true;
    if (bc.causal) c.diag = 0, c.wr = 0;
    Inputs in;
    AttentionParams p = build(c, in, rng);
    setenv("STEELATTN_GENERIC_FORCE_SIMT", "0", 1);
    for (int w = 0; w < 2; ++w) cuda_generic_forward(p, nullptr);
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    const int iters = 5;
    cudaEventRecord(e0);
    for (int it = 0; it < iters; ++it) cuda_generic_forward(p, nullptr);
    cudaEventRecord(e1);
    CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    ms /= iters;
    const double flops = 4.0 * c.B * c.H * c.N * c.S * c.D * (bc.causal ? 0.5 : 1.0);
    std::printf("bench %-5s B%lld H%lld N=S=%lld D%lld %-6s %8.3f ms %7.1f TFLOP/s\n",
                dname(c.dt), (long long)c.B, (long long)c.H, (long long)c.N, (long long)c.D,
                bc.causal ? "causal" : "full", ms, flops / ms * 1e-9);
    for (Tensor* t : {&in.q, &in.k, &in.v, &in.out, &in.lse}) t->release();
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool small = argc > 1 && std::strcmp(argv[1], "--small") == 0;
  // --from K: skip cases before index K (to continue after a crashed case).
  const int from = argc > 2 && std::strcmp(argv[1], "--from") == 0 ? std::atoi(argv[2]) : 0;
  if (argc > 1 && std::strcmp(argv[1], "--bench") == 0) {
    bench();
    return 0;
  }
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  std::mt19937_64 rng(20261127);
  int passed = 0, failed = 0;
  const std::vector<Case> cases = all_cases(small);
  for (int i = 0; i < int(cases.size()); ++i) {
    if (i < from) continue;
    (run_case(cases[i], rng, i) ? passed : failed)++;
  }
  {
    // Head dims past 512 are refused with a reason, not launched.
    AttentionParams p;
    p.q.device = Device::cuda, p.q.dtype = DType::f16;
    p.B = p.H = p.Hkv = 1, p.N = p.S = 8, p.D = 64, p.Dv = 513;
    std::string why;
    const bool refused = !cuda_generic_supports(p, &why) && !why.empty();
    std::printf("%s [#-] %-48s %s\n", refused ? "ok  " : "FAIL", "supports() refuses Dv=513",
                why.c_str());
    (refused ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
