// steelattn._torch_native: the torch-facing calls in C++, for eager calls.
//
// Why: the host time of a call. A Python autograd.Function costs ~136 us of host time per
// forward + backward on the H200's host even when it launches nothing (its backward runs on
// the autograd engine's device thread and must take the GIL there); torch's own SDPA pays
// ~140 us for the whole step. A torch::autograd::Function has no Python in its backward at
// all, and reading at::Tensor fields here costs nothing where _ext reads each tensor through
// the Python C API (~0.7 us a tensor).
//
// This module is optional and tied to the torch it was built against (libtorch's C++ API
// has no stable ABI): steelattn/_native.py loads it only when torch.__version__ is the one
// recorded here; otherwise _kernel.py and _autograd.py use _ext and the Python Function.
// It holds no kernels: every call goes through the core in steelattn._ext, reached through
// the C table that module exports (core_api.h), so the process has one copy of the core.
//
// Python entries (the same arguments as _kernel.run_forward / _autograd.Attention):
//   forward(q, k, v, alibi, bias, bool_mask, scalars, extra, want_lse, poison)
//     -> (out, lse or None, path, note): an inference call, no autograd node.
//   attention(q, k, v, alibi, bias, bool_mask, scalars, extra, poison) -> (out, lse, path, note):
//     a call that needs gradients (q, k, v and bias), its autograd node in C++. Backward
//     paths and demotions are counted here (the backward runs without Python) and drained
//     into steelattn's dispatch stats by take_backward_counts().
//   kv_append(...): a KV-cache step's append and RoPE, _kernel.kv_append's arguments.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "python/core_api.h"

namespace {

using at::Tensor;
using steelattn::AttentionParams;
using steelattn::TensorRef;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const steelattn_core_api* g_core = nullptr;  // from steelattn._ext.core_api, set at import

constexpr int kNumScalars = 9;  // _kernel.scalars order
constexpr int kNumExtra = 9;    // _extra.Extra order

// ---- tensors -> TensorRef -----------------------------------------------------------
steelattn::DType dtype_code(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return steelattn::DType::f32;
    case at::kHalf: return steelattn::DType::f16;
    case at::kBFloat16: return steelattn::DType::bf16;
    case at::kDouble: return steelattn::DType::f64;
    case at::kBool: return steelattn::DType::boolean;
    case at::kInt: return steelattn::DType::i32;
    case at::kLong: return steelattn::DType::i64;
    case at::kByte: return steelattn::DType::u8;
    default: TORCH_CHECK_TYPE(false, name, ": unsupported dtype ", t);
  }
}

TensorRef ref(const Tensor& t, const char* name) {
  TensorRef r;
  if (!t.defined()) return r;
  TORCH_CHECK_VALUE(t.dim() <= 4, name, ": at most 4 dims are supported");
  r.dtype = dtype_code(t.scalar_type(), name);
  if (t.is_cuda()) {
    r.device = steelattn::Device::cuda;
    r.device_id = t.get_device();
  } else {
    TORCH_CHECK_VALUE(t.is_cpu(), name, ": unsupported device (steelattn runs on CPU and CUDA tensors)");
    r.device = steelattn::Device::cpu;
  }
  r.ndim = static_cast<int32_t>(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) {
    r.shape[i] = t.size(i);
    r.stride[i] = t.stride(i);
  }
  r.data = t.data_ptr();
  // Size-0 tensors may carry a null pointer; keep "present" meaning "given" (as ext.cpp does).
  if (!r.data) r.data = reinterpret_cast<void*>(uintptr_t(64));
  return r;
}

TensorRef ref(const std::optional<Tensor>& t, const char* name) { return t ? ref(*t, name) : TensorRef{}; }

void* current_stream(const Tensor& q) {
  if (!q.is_cuda()) return nullptr;
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(q.device()).native_handle();
}

// ---- the call's state, kept for the backward -----------------------------------------
struct CallState : torch::CustomClassHolder {
  AttentionParams base;  // the scalars and the extras' TensorRefs
  std::optional<Tensor> alibi, bool_mask;
  Tensor extra[kNumExtra];  // cu_seqlens_q/k, block_mask, -, -, seqlens_k, block_table, kv_batch_idx, -
  bool poison = false;
  bool has_seqlens_k = false;
};

// Scratch from torch's allocator (the caller's stream; CUDA graphs capture it).
struct TorchAlloc {
  c10::Device device;
  Tensor tensor;
};
bool torch_alloc(void* ctx, size_t bytes, TensorRef* out) {
  auto* a = static_cast<TorchAlloc*>(ctx);
  a->tensor = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(a->device));
  *out = ref(a->tensor, "workspace");
  return true;
}

[[noreturn]] void throw_status(const steelattn_call_result& r) {
  switch (static_cast<steelattn::StatusCode>(r.status)) {
    case steelattn::StatusCode::invalid_argument: TORCH_CHECK_VALUE(false, r.message);
    case steelattn::StatusCode::not_implemented: TORCH_CHECK_NOT_IMPLEMENTED(false, r.message);
    default: TORCH_CHECK(false, r.message);
  }
}

// ---- backward counts (the backward runs without Python) -------------------------------
std::mutex g_count_mutex;
std::map<std::string, int64_t> g_backward_paths, g_backward_demotions;

void count_backward(const char* path, const char* demoted) {
  const std::lock_guard<std::mutex> lock(g_count_mutex);
  ++g_backward_paths[path];
  if (demoted[0]) ++g_backward_demotions[demoted];
}

// What the forward reports back to Python (set inside Function::apply, read after it).
thread_local std::string t_path, t_note;

void fill_params(AttentionParams& p, const CallState& s, const Tensor& q, const Tensor& k, const Tensor& v,
                 const std::optional<Tensor>& bias) {
  p = s.base;
  p.q = ref(q, "q");
  p.k = ref(k, "k");
  p.v = ref(v, "v");
  p.bias = ref(bias, "bias");
  p.alibi_slopes = ref(s.alibi, "alibi_slopes");
  p.bool_mask = ref(s.bool_mask, "bool_mask");
  p.num_threads = at::get_num_threads();
}

struct ForwardResult {
  Tensor out, lse;
};

// Allocates out (and lse) and runs the forward (STEELATTN_RUN or STEELATTN_TRAIN); the path
// and note go to t_path / t_note. Empty problems are selected, not run: zeros and lse = -inf.
ForwardResult run_forward(const CallState& s, const Tensor& q, const Tensor& k, const Tensor& v,
                          const std::optional<Tensor>& bias, int mode, bool want_lse) {
  AttentionParams p;
  fill_params(p, s, q, k, v, bias);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), S = k.size(2), Dv = v.size(3);
  const auto opts = q.options();
  // Varlen: a token-major q gets a token-major out ([total, H, Dv] viewed [1, H, total, Dv]),
  // so the caller's layout comes back contiguous (_kernel.token_major_out).
  const bool token_major = s.extra[0].defined() && B == 1 && H > 1 && q.stride(1) < q.stride(2);
  ForwardResult r{token_major ? at::empty({N, H, Dv}, opts).permute({1, 0, 2}).unsqueeze(0)
                              : at::empty({B, H, N, Dv}, opts),
                  {}};
  if (want_lse) r.lse = at::empty({B, H, N}, opts.dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (s.poison) {
    r.out.fill_(std::numeric_limits<double>::quiet_NaN());
    if (want_lse) r.lse.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  p.out = ref(r.out, "out");
  p.lse = ref(r.lse, "lse");
  const bool empty = !(S && r.out.numel());
  TorchAlloc alloc{q.device(), {}};
  steelattn_call_result c;
  g_core->forward(&p, empty ? STEELATTN_SELECT : mode, current_stream(q), &torch_alloc, &alloc, &c);
  if (c.status != 0) throw_status(c);
  if (empty) {  // nothing to compute: the core validated and selected, the result is known
    const bool none = std::string(c.path) == "none";
    const bool no_bwd = mode == STEELATTN_TRAIN && std::string(c.bpath) == "none";
    TORCH_CHECK_NOT_IMPLEMENTED(!none && !no_bwd, none ? c.note : c.bnote);
    r.out.zero_();
    if (want_lse) r.lse.fill_(-std::numeric_limits<double>::infinity());
  }
  t_path = c.path;
  t_note = c.note;
  return r;
}

struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                               const std::optional<Tensor>& bias, c10::intrusive_ptr<CallState> state) {
    ForwardResult r = run_forward(*state, q, k, v, bias, STEELATTN_TRAIN, true);
    ctx->save_for_backward({q, k, v, r.out, r.lse, bias ? *bias : Tensor()});
    ctx->saved_data["state"] = c10::IValue::make_capsule(std::move(state));
    ctx->set_materialize_grads(false);  // an unused lse gets an undefined gradient, not zeros
    return {r.out, r.lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto state = c10::static_intrusive_pointer_cast<CallState>(ctx->saved_data["state"].toCapsule());
    const CallState& s = *state;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const std::optional<Tensor> bias = saved[5].defined() ? std::optional<Tensor>(saved[5]) : std::nullopt;
    Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);  // only lse was used
    // e.g. out.sum()'s expanded ones; clone, not contiguous(): an empty tensor counts as
    // contiguous whatever its strides
    if (dout.size(-1) > 1 && dout.stride(-1) != 1) dout = dout.clone(at::MemoryFormat::Contiguous);
    Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    if (s.poison)
      for (Tensor* t : {&dq, &dk, &dv}) t->fill_(std::numeric_limits<double>::quiet_NaN());
    if (s.has_seqlens_k) {  // keys past a cache's length get no gradient
      dk.zero_();
      dv.zero_();
    }
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2), S = k.size(2);
    Tensor dbias;
    if (bias && ctx->needs_input_grad(3)) dbias = at::zeros({B, H, N, S}, lse.options());
    AttentionParams p;
    fill_params(p, s, q, k, v, bias);
    p.out = ref(out, "out");
    p.lse = ref(lse, "lse");
    p.dout = ref(dout, "dout");
    p.dlse = ref(grads[1], "dlse");
    p.dq = ref(dq, "dq");
    p.dk = ref(dk, "dk");
    p.dv = ref(dv, "dv");
    p.dbias = ref(dbias, "dbias");
    TorchAlloc alloc{q.device(), {}};
    steelattn_call_result r;
    g_core->backward(&p, current_stream(q), &torch_alloc, &alloc, &r);
    if (r.status != 0) throw_status(r);
    count_backward(r.path, r.note);
    if (!(q.numel() && S)) {  // no kernel ran: the gradients of an empty problem are zeros
      dq.zero_();
      dk.zero_();
      dv.zero_();
    }
    return once_differentiable({dq, dk, dv, dbias, Tensor()}, grads);
  }

  // The kernels' gradients are not differentiable. Under create_graph they get a node that
  // raises when a second derivative is taken, instead of silently giving a wrong one (what
  // Python's @once_differentiable does).
  static variable_list once_differentiable(variable_list grads_out, const variable_list& grads_in) {
    if (!c10::GradMode::is_enabled()) return grads_out;
    bool requires_grad = false;
    for (const Tensor& g : grads_in) requires_grad |= g.defined() && g.requires_grad();
    if (!requires_grad) return grads_out;
    for (Tensor& g : grads_out)
      if (g.defined()) g = g.detach().requires_grad_(true);
    const auto n = static_cast<int64_t>(grads_out.size());
    return torch::autograd::DelayedError(
               "trying to differentiate twice a function that was marked with @once_differentiable (the steelattn "
               "attention backward)", n)
        .apply(std::move(grads_out));
  }
};

// ---- Python bindings (plain C API: the fastest call path) ------------------------------
bool is_tensor(PyObject* o) { return THPVariable_Check(o); }

std::optional<Tensor> opt_tensor(PyObject* o, const char* name) {
  if (o == Py_None) return std::nullopt;
  TORCH_CHECK_TYPE(is_tensor(o), name, ": expected a torch.Tensor or None");
  return THPVariable_Unpack(o);
}

double as_double(PyObject* o) {
  const double d = PyFloat_AsDouble(o);
  if (d == -1.0 && PyErr_Occurred()) throw python_error();
  return d;
}

int64_t as_int(PyObject* o) {
  const long long i = PyLong_AsLongLong(o);
  if (i == -1 && PyErr_Occurred()) throw python_error();
  return i;
}

// Parses (q, k, v, alibi, bias, bool_mask, scalars, extra) into the call's state.
struct Parsed {
  const Tensor *q, *k, *v;
  std::optional<Tensor> bias;
  c10::intrusive_ptr<CallState> state;
};
Parsed parse(PyObject* const* args) {
  for (int i = 0; i < 3; ++i) TORCH_CHECK_TYPE(is_tensor(args[i]), "q, k, v: expected torch.Tensor");
  Parsed r{&THPVariable_Unpack(args[0]), &THPVariable_Unpack(args[1]), &THPVariable_Unpack(args[2]),
           opt_tensor(args[4], "bias"), c10::make_intrusive<CallState>()};
  // Outputs take q's dtype: refuse others before allocating (the core checks the rest).
  TORCH_CHECK_TYPE(at::isFloatingType(r.q->scalar_type()) && r.q->scalar_type() != at::kFloat8_e4m3fn,
                   "q: expected a float tensor, got ", r.q->scalar_type());
  CallState& s = *r.state;
  s.alibi = opt_tensor(args[3], "alibi_slopes");
  s.bool_mask = opt_tensor(args[5], "bool_mask");
  PyObject* sc = args[6];
  TORCH_CHECK_TYPE(PyTuple_Check(sc) && PyTuple_GET_SIZE(sc) == kNumScalars, "scalars: expected 9 values");
  AttentionParams& b = s.base;
  b.scale = as_double(PyTuple_GET_ITEM(sc, 0));
  b.softcap = as_double(PyTuple_GET_ITEM(sc, 1));
  b.diag_offset = as_int(PyTuple_GET_ITEM(sc, 2));
  b.window_left = as_int(PyTuple_GET_ITEM(sc, 3));
  b.window_right = as_int(PyTuple_GET_ITEM(sc, 4));
  b.dropout_p = static_cast<float>(as_double(PyTuple_GET_ITEM(sc, 5)));
  b.dropout_seed = static_cast<uint64_t>(as_int(PyTuple_GET_ITEM(sc, 6)));
  b.dropout_offset = static_cast<uint64_t>(as_int(PyTuple_GET_ITEM(sc, 7)));
  b.deterministic = PyObject_IsTrue(PyTuple_GET_ITEM(sc, 8)) == 1;
  PyObject* ex = args[7];
  if (ex != Py_None) {
    TORCH_CHECK_TYPE(PyTuple_Check(ex) && PyTuple_GET_SIZE(ex) == kNumExtra, "extra: expected an _extra.Extra");
    static const char* names[kNumExtra] = {"cu_seqlens_q", "cu_seqlens_k", "block_mask",   "block_q",   "block_k",
                                           "seqlens_k",    "block_table",  "kv_batch_idx", "num_splits"};
    for (int i = 0; i < kNumExtra; ++i) {
      if (i == 3 || i == 4 || i == 8) continue;  // ints
      if (auto t = opt_tensor(PyTuple_GET_ITEM(ex, i), names[i])) s.extra[i] = *t;
    }
    b.cu_seqlens_q = ref(s.extra[0], names[0]);
    b.cu_seqlens_k = ref(s.extra[1], names[1]);
    b.block_mask = ref(s.extra[2], names[2]);
    b.block_q = as_int(PyTuple_GET_ITEM(ex, 3));
    b.block_k = as_int(PyTuple_GET_ITEM(ex, 4));
    b.seqlens_k = ref(s.extra[5], names[5]);
    b.block_table = ref(s.extra[6], names[6]);
    b.kv_batch_idx = ref(s.extra[7], names[7]);
    b.num_splits = static_cast<int32_t>(as_int(PyTuple_GET_ITEM(ex, 8)));
    s.has_seqlens_k = s.extra[5].defined();
  }
  return r;
}

PyObject* result(Tensor out, Tensor lse) {
  PyObject* o = THPVariable_Wrap(std::move(out));
  PyObject* l = lse.defined() ? THPVariable_Wrap(std::move(lse)) : (Py_INCREF(Py_None), Py_None);
  return Py_BuildValue("(NNss)", o, l, t_path.c_str(), t_note.c_str());
}

PyObject* forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 10, "forward: expected 10 arguments, got ", nargs);
  Parsed a = parse(args);
  a.state->poison = PyObject_IsTrue(args[9]) == 1;
  const bool want_lse = PyObject_IsTrue(args[8]) == 1;
  ForwardResult r;
  {
    pybind11::gil_scoped_release no_gil;
    r = run_forward(*a.state, *a.q, *a.k, *a.v, a.bias, STEELATTN_RUN, want_lse);
  }
  return result(std::move(r.out), std::move(r.lse));
  END_HANDLE_TH_ERRORS
}

PyObject* attention(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 9, "attention: expected 9 arguments, got ", nargs);
  Parsed a = parse(args);
  a.state->poison = PyObject_IsTrue(args[8]) == 1;
  variable_list res;
  {
    pybind11::gil_scoped_release no_gil;
    res = AttentionFunction::apply(*a.q, *a.k, *a.v, a.bias, a.state);
  }
  return result(std::move(res[0]), std::move(res[1]));
  END_HANDLE_TH_ERRORS
}

// kv_append(k_new, v_new, k_cache, v_cache, seqlens, block_table, kv_batch_idx, q, q_out, cos, sin,
//           rotary_dim, interleaved, q_causal): _kernel.kv_append's arguments.
PyObject* kv_append(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 14, "kv_append: expected 14 arguments, got ", nargs);
  static const char* names[11] = {"k_new", "v_new",   "k_cache", "v_cache", "seqlens",   "block_table",
                                  "kv_batch_idx", "q", "q_out",   "rotary_cos", "rotary_sin"};
  std::optional<Tensor> t[11];
  for (int i = 0; i < 11; ++i) t[i] = opt_tensor(args[i], names[i]);
  TORCH_CHECK_TYPE(t[0].has_value(), "k_new: expected a torch.Tensor");
  steelattn::KVAppendParams p;
  TensorRef* refs[11] = {&p.k_new, &p.v_new, &p.k_cache, &p.v_cache, &p.seqlens, &p.block_table,
                         &p.kv_batch_idx, &p.q, &p.q_out, &p.rotary_cos, &p.rotary_sin};
  for (int i = 0; i < 11; ++i) *refs[i] = ref(t[i], names[i]);
  p.rotary_dim = as_int(args[11]);
  p.interleaved = PyObject_IsTrue(args[12]) == 1;
  p.q_causal = PyObject_IsTrue(args[13]) == 1;
  p.num_threads = at::get_num_threads();
  steelattn_call_result r;
  {
    pybind11::gil_scoped_release no_gil;
    g_core->kv_append(&p, current_stream(*t[0]), &r);
  }
  if (r.status != 0) throw_status(r);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* take_backward_counts(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  std::map<std::string, int64_t> paths, demotions;
  {
    const std::lock_guard<std::mutex> lock(g_count_mutex);
    paths.swap(g_backward_paths);
    demotions.swap(g_backward_demotions);
  }
  PyObject* r = PyTuple_New(2);
  int slot = 0;
  for (const auto* m : {&paths, &demotions}) {
    PyObject* d = PyDict_New();
    for (const auto& [key, n] : *m) {
      PyObject* value = PyLong_FromLongLong(n);
      PyDict_SetItemString(d, key.c_str(), value);
      Py_DECREF(value);
    }
    PyTuple_SET_ITEM(r, slot++, d);
  }
  return r;
  END_HANDLE_TH_ERRORS
}

PyObject* bind_core(PyObject*, PyObject* capsule) {
  auto* api = static_cast<const steelattn_core_api*>(PyCapsule_GetPointer(capsule, "steelattn._ext.core_api"));
  if (!api) return nullptr;
  if (api->version != STEELATTN_CORE_API_VERSION || api->params_bytes != sizeof(AttentionParams)) {
    PyErr_SetString(PyExc_ImportError, "steelattn._torch_native: built for another steelattn._ext");
    return nullptr;
  }
  g_core = api;
  Py_RETURN_NONE;
}

PyMethodDef g_methods[] = {
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&forward)), METH_FASTCALL,
     "forward(q, k, v, alibi, bias, bool_mask, scalars, extra, want_lse, poison) -> (out, lse or None, path, "
     "note): an inference call (no autograd node)."},
    {"attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&attention)), METH_FASTCALL,
     "attention(q, k, v, alibi, bias, bool_mask, scalars, extra, poison) -> (out, lse, path, note): one "
     "differentiable attention call whose autograd node is C++ (gradients for q, k, v and bias)."},
    {"kv_append", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&kv_append)), METH_FASTCALL,
     "kv_append(k_new, v_new, k_cache, v_cache, seqlens, block_table, kv_batch_idx, q, q_out, cos, sin, "
     "rotary_dim, interleaved, q_causal): a KV-cache step's append and RoPE (steelattn.h kv_append)."},
    {"take_backward_counts", &take_backward_counts, METH_NOARGS,
     "({path: n}, {demotion: n}) of the backwards run since the last call, and reset."},
    {"bind_core", &bind_core, METH_O, "Bind to steelattn._ext.core_api (once, at import)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef g_module = {PyModuleDef_HEAD_INIT, "_torch_native",
                        "steelattn's eager calls and their autograd node in C++ (optional; tied to one torch version)",
                        -1,
                        g_methods};

}  // namespace

PyMODINIT_FUNC PyInit__torch_native() {
  PyObject* m = PyModule_Create(&g_module);
  if (m) PyModule_AddStringConstant(m, "torch_version", STEELATTN_TORCH_VERSION);
  return m;
}
