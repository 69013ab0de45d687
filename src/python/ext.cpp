// nanobind module steelattn._ext: the thin bridge between Python and the core.
//
// Tensors arrive as torch tensors, read through the Python C API (data_ptr(),
// shape, stride(), dtype, device), so the extension links no libtorch and one
// build serves every torch version; DLPack is not used because torch refuses to
// export tensors that require grad and a CUDA export may synchronise streams.
// A (data_ptr, dtype, device, device_index, shape, strides) tuple is accepted too:
// get_supported_configs() describes calls that are selected but never run.
// The Python caller (python/steelattn/_kernel.py, the only one) keeps every
// tensor alive for the duration of the call.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <cstdint>
#include <string>

#include "python/core_api.h"
#include "steelattn/steelattn.h"

namespace nb = nanobind;
using namespace steelattn;

namespace {

constexpr int kNumDTypes = 8;
PyObject* g_dtypes[kNumDTypes] = {};  // torch dtype objects by steelattn::DType code (register_dtypes)

struct Names {  // interned attribute names, looked up once
  PyObject* data_ptr = PyUnicode_InternFromString("data_ptr");
  PyObject* shape = PyUnicode_InternFromString("shape");
  PyObject* stride = PyUnicode_InternFromString("stride");
  PyObject* dtype = PyUnicode_InternFromString("dtype");
  PyObject* is_cuda = PyUnicode_InternFromString("is_cuda");
  PyObject* is_cpu = PyUnicode_InternFromString("is_cpu");
  PyObject* get_device = PyUnicode_InternFromString("get_device");
};
const Names& names() {
  static const Names n;
  return n;
}

[[noreturn]] void bad(const char* name, const std::string& what, bool type_error = true) {
  PyErr_Clear();
  const std::string m = std::string(name) + ": " + what;
  if (type_error) throw nb::type_error(m.c_str());
  throw nb::value_error(m.c_str());
}

nb::object get(PyObject* o, PyObject* attr, const char* name) {
  PyObject* r = PyObject_GetAttr(o, attr);
  if (!r) bad(name, "expected a torch.Tensor");
  return nb::steal(r);
}

nb::object call(PyObject* o, PyObject* method, const char* name) {
  PyObject* r = PyObject_CallMethodNoArgs(o, method);
  if (!r) bad(name, "expected a torch.Tensor");
  return nb::steal(r);
}

void set_dims(TensorRef& t, PyObject* shape, PyObject* stride, const char* name) {
  const Py_ssize_t n = PyTuple_GET_SIZE(shape);
  if (n > 4 || PyTuple_GET_SIZE(stride) != n) bad(name, "at most 4 dims are supported", false);
  t.ndim = int32_t(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    t.shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
    t.stride[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(stride, i));
  }
  if (PyErr_Occurred()) bad(name, "malformed shape or strides", false);
}

TensorRef from_tuple(nb::handle obj, const char* name) {
  nb::tuple tup = nb::borrow<nb::tuple>(obj);
  if (tup.size() != 6) bad(name, "malformed tensor description", false);
  TensorRef t;
  t.data = reinterpret_cast<void*>(nb::cast<uintptr_t>(tup[0]));
  t.dtype = static_cast<DType>(nb::cast<int>(tup[1]));
  t.device = static_cast<Device>(nb::cast<int>(tup[2]));
  t.device_id = nb::cast<int>(tup[3]);
  if (!PyTuple_Check(tup[4].ptr()) || !PyTuple_Check(tup[5].ptr())) bad(name, "malformed tensor description", false);
  set_dims(t, tup[4].ptr(), tup[5].ptr(), name);
  return t;
}

TensorRef to_ref(nb::handle obj, const char* name) {
  TensorRef t;
  if (obj.is_none()) return t;
  if (PyTuple_Check(obj.ptr())) {
    t = from_tuple(obj, name);
  } else {
    PyObject* o = obj.ptr();
    const Names& s = names();
    nb::object dt = get(o, s.dtype, name);
    int code = -1;
    for (int i = 0; i < kNumDTypes; ++i)
      if (dt.ptr() == g_dtypes[i]) code = i;
    if (code < 0) bad(name, "unsupported dtype " + nb::cast<std::string>(nb::str(dt)));
    t.dtype = static_cast<DType>(code);
    if (get(o, s.is_cuda, name).ptr() == Py_True) {
      t.device = Device::cuda;
      t.device_id = int32_t(PyLong_AsLong(call(o, s.get_device, name).ptr()));
    } else if (get(o, s.is_cpu, name).ptr() == Py_True) {
      t.device = Device::cpu;
    } else {
      bad(name, "unsupported device (steelattn runs on CPU and CUDA tensors)", false);
    }
    t.data = PyLong_AsVoidPtr(call(o, s.data_ptr, name).ptr());
    nb::object shape = get(o, s.shape, name), stride = call(o, s.stride, name);
    if (!PyTuple_Check(shape.ptr()) || !PyTuple_Check(stride.ptr())) bad(name, "expected a torch.Tensor");
    set_dims(t, shape.ptr(), stride.ptr(), name);
  }
  // Size-0 tensors may carry a null pointer; keep "present" meaning "given".
  if (!t.data) t.data = reinterpret_cast<void*>(uintptr_t(64));
  return t;
}

[[noreturn]] void raise(const Status& st) {
  switch (st.code) {
    case StatusCode::invalid_argument: throw nb::value_error(st.message.c_str());
    case StatusCode::not_implemented:
      PyErr_SetString(PyExc_NotImplementedError, st.message.c_str());
      throw nb::python_error();
    default: throw std::runtime_error(st.message);
  }
}

// `scalars` is (scale, softcap, diag_offset, window_left, window_right, dropout_p, seed,
// offset, deterministic), built once per call by _kernel.Call and reused by the backward.
AttentionParams make_params(nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse,
                            nb::handle bias, nb::handle bool_mask, nb::handle alibi_slopes, nb::tuple scalars,
                            int num_threads, nb::handle cu_seqlens_q, nb::handle cu_seqlens_k,
                            nb::handle block_mask, int64_t block_q, int64_t block_k, nb::handle seqlens_k,
                            nb::handle block_table, nb::handle kv_batch_idx, int num_splits) {
  if (scalars.size() != 9) throw nb::value_error("scalars: expected 9 values");
  AttentionParams p;
  p.q = to_ref(q, "q");
  p.k = to_ref(k, "k");
  p.v = to_ref(v, "v");
  p.out = to_ref(out, "out");
  p.lse = to_ref(lse, "lse");
  p.bias = to_ref(bias, "bias");
  p.bool_mask = to_ref(bool_mask, "bool_mask");
  p.alibi_slopes = to_ref(alibi_slopes, "alibi_slopes");
  p.cu_seqlens_q = to_ref(cu_seqlens_q, "cu_seqlens_q");
  p.cu_seqlens_k = to_ref(cu_seqlens_k, "cu_seqlens_k");
  p.block_mask = to_ref(block_mask, "block_mask");
  p.block_q = block_q;
  p.block_k = block_k;
  p.seqlens_k = to_ref(seqlens_k, "seqlens_k");
  p.block_table = to_ref(block_table, "block_table");
  p.kv_batch_idx = to_ref(kv_batch_idx, "kv_batch_idx");
  p.num_splits = num_splits;
  p.scale = nb::cast<double>(scalars[0]);
  p.softcap = nb::cast<double>(scalars[1]);
  p.diag_offset = nb::cast<int64_t>(scalars[2]);
  p.window_left = nb::cast<int64_t>(scalars[3]);
  p.window_right = nb::cast<int64_t>(scalars[4]);
  p.dropout_p = nb::cast<float>(scalars[5]);
  p.dropout_seed = nb::cast<uint64_t>(scalars[6]);
  p.dropout_offset = nb::cast<uint64_t>(scalars[7]);
  p.deterministic = nb::cast<bool>(scalars[8]);
  p.num_threads = num_threads;
  return p;
}

// What a caller reports: the path, and why none was found or why a faster one refused.
const std::string& note(const PathChoice& c) { return c.path == ForwardPath::none ? c.why_not : c.demoted; }

// The backward's selection predicted at forward time: out, q, k, v stand in for dout,
// dq, dk, dv (the gradients are allocated like them).
PathChoice predict_backward(const AttentionParams& p) {
  AttentionParams b = p;
  b.attn_weights = TensorRef{};
  b.dout = p.out;
  b.dq = p.q;
  b.dk = p.k;
  b.dv = p.v;
  return choose_backward_path(b);
}

// The strings a call reports, kept per thread until that thread's next call (core_api.h).
struct CallStrings {
  std::string message, note, bnote;
};
thread_local CallStrings t_strings;

void set_status(const Status& st, steelattn_call_result* r) {
  r->status = static_cast<int32_t>(st.code);
  t_strings.message = st.message;
  r->message = t_strings.message.c_str();
}

// One forward: validate, select, scratch, run (core_api.h). The nanobind binding below
// and steelattn._torch_native both come here.
void core_forward(AttentionParams* p, int mode, void* stream, steelattn_alloc_fn alloc, void* alloc_ctx,
                  steelattn_call_result* r) {
  *r = steelattn_call_result{0, "", "none", "", "", ""};
  Status st = validate_forward(*p);
  if (!st.ok()) return set_status(st, r);
  const PathChoice fwd = choose_forward_path(*p);
  PathChoice bwd;
  if (mode != STEELATTN_RUN) bwd = predict_backward(*p);
  t_strings.note = note(fwd);
  t_strings.bnote = note(bwd);
  r->path = path_name(fwd.path);
  r->note = t_strings.note.c_str();
  r->bpath = mode == STEELATTN_RUN ? "" : path_name(bwd.path);
  r->bnote = t_strings.bnote.c_str();
  if (mode == STEELATTN_SELECT) return;
  if (fwd.path == ForwardPath::none)
    return set_status(Status::NotImplemented("no steelattn kernel serves this call: " + fwd.why_not), r);
  if (mode == STEELATTN_TRAIN && bwd.path == ForwardPath::none)
    return set_status(
        Status::NotImplemented("no steelattn kernel computes the gradients of this call: " + bwd.why_not), r);
  // scratch: the split-KV decode kernel's partials, a block mask's per-tile state
  if (const size_t need = forward_workspace_bytes(*p, fwd.path)) {
    if (alloc == nullptr || !alloc(alloc_ctx, need, &p->workspace))
      return set_status(Status::Error("could not allocate the forward's scratch"), r);
  }
  set_status(run_forward(*p, fwd.path, stream), r);
}

void core_backward(AttentionParams* p, void* stream, steelattn_alloc_fn alloc, void* alloc_ctx,
                   steelattn_call_result* r) {
  *r = steelattn_call_result{0, "", "none", "", "", ""};
  Status st = validate_backward(*p);
  if (!st.ok()) return set_status(st, r);
  const PathChoice c = choose_backward_path(*p);
  t_strings.note = note(c);
  r->path = path_name(c.path);
  r->note = t_strings.note.c_str();
  if (c.path == ForwardPath::none)
    return set_status(Status::NotImplemented("no steelattn kernel computes this backward: " + c.why_not), r);
  // The kernel's scratch comes from the caller's allocator (torch's, so CUDA graphs capture it).
  if (const size_t need = backward_workspace_bytes(*p, c.path)) {
    if (alloc == nullptr || !alloc(alloc_ctx, need, &p->workspace))
      return set_status(Status::Error("could not allocate the backward's scratch"), r);
  }
  set_status(run_backward(*p, c.path, stream), r);
}

void core_kv_append(KVAppendParams* p, void* stream, steelattn_call_result* r) {
  *r = steelattn_call_result{0, "", "", "", "", ""};
  set_status(kv_append(*p, stream), r);
}

const steelattn_core_api g_core_api = {STEELATTN_CORE_API_VERSION, sizeof(AttentionParams), &core_forward,
                                       &core_backward, &core_kv_append};

// Scratch for the nanobind bindings: a Python allocator (torch.empty), its tensor kept here.
// Runs with the GIL released around it; a Python error becomes the call's message.
struct PyAlloc {
  nb::handle fn;
  nb::object tensor;
  std::string error;
};
bool py_alloc(void* ctx, size_t bytes, TensorRef* out) {
  auto* a = static_cast<PyAlloc*>(ctx);
  nb::gil_scoped_acquire gil;
  if (a->fn.is_none()) {
    a->error = "alloc_workspace: this call needs scratch";
    return false;
  }
  try {
    a->tensor = nb::borrow(a->fn)(bytes);
    *out = to_ref(a->tensor, "workspace");
  } catch (const std::exception& e) {
    a->error = std::string("alloc_workspace: ") + e.what();
    return false;
  }
  return true;
}

void raise_result(const steelattn_call_result& r, const PyAlloc& a) {
  if (!a.error.empty()) throw nb::value_error(a.error.c_str());
  if (r.status != 0) raise(Status{static_cast<StatusCode>(r.status), r.message});
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "steelattn core bindings (torch tensors read through the Python C API; no libtorch)";

  m.def(
      "register_dtypes",
      [](nb::tuple dtypes) {
        if (dtypes.size() != kNumDTypes) throw nb::value_error("register_dtypes: expected 8 dtypes");
        for (int i = 0; i < kNumDTypes; ++i) {
          Py_XDECREF(g_dtypes[i]);
          g_dtypes[i] = dtypes[i].inc_ref().ptr();
        }
      },
      "The torch dtype objects in steelattn::DType code order (float32, float16, bfloat16, float64, bool, "
      "int32, int64, uint8).");

  m.def(
      "forward",
      [](nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse, nb::handle attn_weights,
         nb::handle bias, nb::handle bool_mask, nb::handle alibi_slopes, nb::tuple scalars, int num_threads,
         uintptr_t stream, int mode, nb::handle alloc_workspace, nb::handle cu_seqlens_q,
         nb::handle cu_seqlens_k, nb::handle block_mask, int64_t block_q, int64_t block_k, nb::handle seqlens_k,
         nb::handle block_table, nb::handle kv_batch_idx, int num_splits) {
        AttentionParams p = make_params(q, k, v, out, lse, bias, bool_mask, alibi_slopes, scalars, num_threads,
                                        cu_seqlens_q, cu_seqlens_k, block_mask, block_q, block_k, seqlens_k,
                                        block_table, kv_batch_idx, num_splits);
        p.attn_weights = to_ref(attn_weights, "attn_weights");
        PyAlloc a{alloc_workspace, {}, {}};
        steelattn_call_result r;
        {
          nb::gil_scoped_release release;
          core_forward(&p, mode, reinterpret_cast<void*>(stream), &py_alloc, &a, &r);
        }
        raise_result(r, a);
        return nb::make_tuple(r.path, r.note, r.bpath, r.bnote);
      },
      nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"), nb::arg("lse").none(),
      nb::arg("attn_weights").none(), nb::arg("bias").none(), nb::arg("bool_mask").none(),
      nb::arg("alibi_slopes").none(), nb::arg("scalars"), nb::arg("num_threads"), nb::arg("stream"),
      nb::arg("mode"), nb::arg("alloc_workspace").none() = nb::none(), nb::arg("cu_seqlens_q").none() = nb::none(),
      nb::arg("cu_seqlens_k").none() = nb::none(),
      nb::arg("block_mask").none() = nb::none(), nb::arg("block_q") = 0, nb::arg("block_k") = 0,
      nb::arg("seqlens_k").none() = nb::none(),
      nb::arg("block_table").none() = nb::none(), nb::arg("kv_batch_idx").none() = nb::none(),
      nb::arg("num_splits") = 0,
      "One attention forward: validate, select, run; a kernel that needs scratch gets it from "
      "alloc_workspace(nbytes). mode 0 runs; 1 runs for training (selects the backward too "
      "and refuses, writing nothing, when no kernel computes it); 2 only selects. Returns (path, note, "
      "backward_path, backward_note): a note is why no kernel serves the call (path 'none') or why a faster "
      "kernel refused it. A call no kernel serves raises NotImplementedError before anything is written.");

  m.def(
      "backward",
      [](nb::handle dout, nb::handle dlse, nb::handle q, nb::handle k, nb::handle v, nb::handle out,
         nb::handle lse, nb::handle dq, nb::handle dk, nb::handle dv, nb::handle dbias, nb::handle bias,
         nb::handle bool_mask, nb::handle alibi_slopes, nb::tuple scalars, int num_threads, uintptr_t stream,
         nb::handle alloc_workspace, nb::handle cu_seqlens_q, nb::handle cu_seqlens_k, nb::handle block_mask,
         int64_t block_q, int64_t block_k, nb::handle seqlens_k, nb::handle block_table, nb::handle kv_batch_idx,
         int num_splits) {
        AttentionParams p = make_params(q, k, v, out, lse, bias, bool_mask, alibi_slopes, scalars, num_threads,
                                        cu_seqlens_q, cu_seqlens_k, block_mask, block_q, block_k, seqlens_k,
                                        block_table, kv_batch_idx, num_splits);
        p.dout = to_ref(dout, "dout");
        p.dlse = to_ref(dlse, "dlse");
        p.dq = to_ref(dq, "dq");
        p.dk = to_ref(dk, "dk");
        p.dv = to_ref(dv, "dv");
        p.dbias = to_ref(dbias, "dbias");
        PyAlloc a{alloc_workspace, {}, {}};
        steelattn_call_result r;
        {
          nb::gil_scoped_release release;
          core_backward(&p, reinterpret_cast<void*>(stream), &py_alloc, &a, &r);
        }
        raise_result(r, a);
        return nb::make_tuple(r.path, r.note);
      },
      nb::arg("dout"), nb::arg("dlse").none(), nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"),
      nb::arg("lse"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"), nb::arg("dbias").none(), nb::arg("bias").none(),
      nb::arg("bool_mask").none(), nb::arg("alibi_slopes").none(), nb::arg("scalars"), nb::arg("num_threads"),
      nb::arg("stream"), nb::arg("alloc_workspace"), nb::arg("cu_seqlens_q").none() = nb::none(),
      nb::arg("cu_seqlens_k").none() = nb::none(), nb::arg("block_mask").none() = nb::none(), nb::arg("block_q") = 0,
      nb::arg("block_k") = 0, nb::arg("seqlens_k").none() = nb::none(),
      nb::arg("block_table").none() = nb::none(), nb::arg("kv_batch_idx").none() = nb::none(),
      nb::arg("num_splits") = 0,
      "Gradients dq, dk, dv (and dbias) of one attention call: validate, select, run. A kernel that needs "
      "scratch gets it from alloc_workspace(nbytes) (a 1-d uint8 tensor). Returns (path, demoted).");

  m.def(
      "dropout_keep_mask",
      [](uintptr_t out, int64_t B, int64_t H, int64_t N, int64_t S, float p, uint64_t seed, uint64_t offset,
         int64_t i0, int64_t j0, int64_t N_total, int64_t S_total) {
        Status st = dropout_keep_mask(reinterpret_cast<uint8_t*>(out), B, H, N, S, p, seed, offset, i0, j0, N_total,
                                      S_total);
        if (!st.ok()) raise(st);
      },
      nb::arg("out"), nb::arg("B"), nb::arg("H"), nb::arg("N"), nb::arg("S"), nb::arg("p"), nb::arg("seed"),
      nb::arg("offset"), nb::arg("i0") = 0, nb::arg("j0") = 0, nb::arg("N_total") = -1, nb::arg("S_total") = -1,
      "Fill a contiguous uint8 [B, H, N, S] buffer with the kernels' dropout keep-mask (rows i0.., columns j0.. "
      "of a [B, H, N_total, S_total] grid).");

  m.def(
      "kv_append",
      [](nb::handle k_new, nb::handle v_new, nb::handle k_cache, nb::handle v_cache, nb::handle seqlens,
         nb::handle block_table, nb::handle kv_batch_idx, nb::handle q, nb::handle q_out, nb::handle rotary_cos,
         nb::handle rotary_sin, int64_t rotary_dim, bool interleaved, bool q_causal, int num_threads,
         uintptr_t stream) {
        KVAppendParams p;
        p.k_new = to_ref(k_new, "k_new");
        p.v_new = to_ref(v_new, "v_new");
        p.k_cache = to_ref(k_cache, "k_cache");
        p.v_cache = to_ref(v_cache, "v_cache");
        p.seqlens = to_ref(seqlens, "seqlens");
        p.block_table = to_ref(block_table, "block_table");
        p.kv_batch_idx = to_ref(kv_batch_idx, "kv_batch_idx");
        p.q = to_ref(q, "q");
        p.q_out = to_ref(q_out, "q_out");
        p.rotary_cos = to_ref(rotary_cos, "rotary_cos");
        p.rotary_sin = to_ref(rotary_sin, "rotary_sin");
        p.rotary_dim = rotary_dim;
        p.interleaved = interleaved;
        p.q_causal = q_causal;
        p.num_threads = num_threads;
        Status st;
        {
          nb::gil_scoped_release release;
          st = kv_append(p, reinterpret_cast<void*>(stream));
        }
        if (!st.ok()) raise(st);
      },
      nb::arg("k_new"), nb::arg("v_new"), nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("seqlens"),
      nb::arg("block_table").none(), nb::arg("kv_batch_idx").none(), nb::arg("q").none(), nb::arg("q_out").none(),
      nb::arg("rotary_cos").none(), nb::arg("rotary_sin").none(), nb::arg("rotary_dim"), nb::arg("interleaved"),
      nb::arg("q_causal"), nb::arg("num_threads"), nb::arg("stream"),
      "A KV-cache step's preparation (steelattn.h kv_append): k_new / v_new into the cache at seqlens, "
      "k_new and q turned by the rotary tables; validated first, nothing written on error.");
  m.attr("core_api") = nb::steal(PyCapsule_New(const_cast<steelattn_core_api*>(&g_core_api),
                                                "steelattn._ext.core_api", nullptr));
  m.def("cpu_isa", &cpu_isa, "The CPU instruction set the CPU kernel dispatches to.");
  m.def("cuda_compiled", &cuda_compiled, "Whether CUDA kernels were compiled into this build.");
}
