// nanobind module steelattn._ext: the thin bridge between Python and the core.
//
// Tensors cross as (data_ptr, dtype, device, device_index, shape, strides)
// tuples built by python/steelattn/_tensor.py rather than DLPack capsules:
// torch refuses to export tensors that require grad, and a DLPack export of a
// CUDA tensor may synchronise streams. The Python caller keeps the tensors
// alive for the duration of the call; the extension links no torch.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <cstdint>
#include <string>

#include "steelattn/steelattn.h"

namespace nb = nanobind;
using namespace steelattn;

namespace {

TensorRef to_ref(const nb::handle& obj, const char* name) {
  TensorRef t;
  if (obj.is_none()) return t;
  nb::tuple tup = nb::cast<nb::tuple>(obj);
  if (tup.size() != 6) throw nb::value_error((std::string(name) + ": malformed tensor description").c_str());
  t.data = reinterpret_cast<void*>(nb::cast<uintptr_t>(tup[0]));
  t.dtype = static_cast<DType>(nb::cast<int>(tup[1]));
  t.device = static_cast<Device>(nb::cast<int>(tup[2]));
  t.device_id = nb::cast<int>(tup[3]);
  nb::tuple shape = nb::cast<nb::tuple>(tup[4]), stride = nb::cast<nb::tuple>(tup[5]);
  if (shape.size() > 4 || stride.size() != shape.size())
    throw nb::value_error((std::string(name) + ": at most 4 dims are supported").c_str());
  t.ndim = int32_t(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    t.shape[i] = nb::cast<int64_t>(shape[i]);
    t.stride[i] = nb::cast<int64_t>(stride[i]);
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

AttentionParams make_params(nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse,
                            nb::handle attn_weights, nb::handle bias, nb::handle bool_mask,
                            nb::handle alibi_slopes, double scale, double softcap, int64_t diag_offset,
                            int64_t window_left, int64_t window_right, float dropout_p, uint64_t seed,
                            uint64_t offset, int num_threads) {
  AttentionParams p;
  p.q = to_ref(q, "q");
  p.k = to_ref(k, "k");
  p.v = to_ref(v, "v");
  p.out = to_ref(out, "out");
  p.lse = to_ref(lse, "lse");
  p.attn_weights = to_ref(attn_weights, "attn_weights");
  p.bias = to_ref(bias, "bias");
  p.bool_mask = to_ref(bool_mask, "bool_mask");
  p.alibi_slopes = to_ref(alibi_slopes, "alibi_slopes");
  p.scale = scale;
  p.softcap = softcap;
  p.diag_offset = diag_offset;
  p.window_left = window_left;
  p.window_right = window_right;
  p.dropout_p = dropout_p;
  p.dropout_seed = seed;
  p.dropout_offset = offset;
  p.num_threads = num_threads;
  return p;
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "steelattn core bindings (tensors as pointer/shape/stride tuples)";

  m.def(
      "forward",
      [](nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse, nb::handle attn_weights,
         nb::handle bias, nb::handle bool_mask, nb::handle alibi_slopes, double scale, double softcap,
         int64_t diag_offset, int64_t window_left, int64_t window_right, float dropout_p, uint64_t seed,
         uint64_t offset, int num_threads, uintptr_t stream, bool dry_run) {
        AttentionParams p = make_params(q, k, v, out, lse, attn_weights, bias, bool_mask, alibi_slopes, scale,
                                        softcap, diag_offset, window_left, window_right, dropout_p, seed,
                                        offset, num_threads);
        if (dry_run) {
          Status st = validate_forward(p);
          if (!st.ok()) raise(st);
          std::string why;
          const ForwardPath path = select_forward_path(p, &why);
          return nb::make_tuple(std::string(path_name(path)), why);
        }
        ForwardPath taken = ForwardPath::none;
        Status st;
        {
          nb::gil_scoped_release release;
          st = attention_forward(p, reinterpret_cast<void*>(stream), &taken);
        }
        if (!st.ok()) raise(st);
        return nb::make_tuple(std::string(path_name(taken)), std::string());
      },
      nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"), nb::arg("lse").none(),
      nb::arg("attn_weights").none(), nb::arg("bias").none(), nb::arg("bool_mask").none(),
      nb::arg("alibi_slopes").none(), nb::kw_only(), nb::arg("scale"), nb::arg("softcap"),
      nb::arg("diag_offset"), nb::arg("window_left"), nb::arg("window_right"), nb::arg("dropout_p"),
      nb::arg("seed"), nb::arg("offset"), nb::arg("num_threads"), nb::arg("stream"), nb::arg("dry_run"),
      "Run (or with dry_run=True only validate and select) one attention forward. Returns (path, why_not).");

  m.def(
      "backward",
      [](nb::handle dout, nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse, nb::handle dq,
         nb::handle dk, nb::handle dv, nb::handle dbias, nb::handle dlse, nb::handle workspace, nb::handle bias,
         nb::handle bool_mask, nb::handle alibi_slopes, double scale, double softcap, int64_t diag_offset,
         int64_t window_left, int64_t window_right, float dropout_p, uint64_t seed, uint64_t offset, int num_threads,
         uintptr_t stream, bool deterministic, bool dry_run) {
        AttentionParams p = make_params(q, k, v, out, lse, nb::none(), bias, bool_mask, alibi_slopes, scale, softcap,
                                        diag_offset, window_left, window_right, dropout_p, seed, offset, num_threads);
        p.dout = to_ref(dout, "dout");
        p.dq = to_ref(dq, "dq");
        p.dk = to_ref(dk, "dk");
        p.dv = to_ref(dv, "dv");
        p.dbias = to_ref(dbias, "dbias");
        p.dlse = to_ref(dlse, "dlse");
        p.workspace = to_ref(workspace, "workspace");
        p.deterministic = deterministic;
        if (dry_run) {
          Status st = validate_backward(p);
          if (!st.ok()) raise(st);
          std::string why;
          const ForwardPath path = select_backward_path(p, &why);
          return nb::make_tuple(std::string(path_name(path)), why, backward_workspace_bytes(p));
        }
        ForwardPath taken = ForwardPath::none;
        Status st;
        {
          nb::gil_scoped_release release;
          st = attention_backward(p, reinterpret_cast<void*>(stream), &taken);
        }
        if (!st.ok()) raise(st);
        return nb::make_tuple(std::string(path_name(taken)), std::string(), size_t(0));
      },
      nb::arg("dout"), nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out"), nb::arg("lse"), nb::arg("dq"),
      nb::arg("dk"), nb::arg("dv"), nb::arg("dbias").none(), nb::arg("dlse").none(), nb::arg("workspace").none(),
      nb::arg("bias").none(), nb::arg("bool_mask").none(), nb::arg("alibi_slopes").none(), nb::kw_only(),
      nb::arg("scale"), nb::arg("softcap"), nb::arg("diag_offset"), nb::arg("window_left"), nb::arg("window_right"),
      nb::arg("dropout_p"), nb::arg("seed"), nb::arg("offset"), nb::arg("num_threads"), nb::arg("stream"),
      nb::arg("deterministic"), nb::arg("dry_run"),
      "Gradients dq, dk, dv (and dbias) of one attention call. Returns (path, why_not, workspace_bytes); "
      "with dry_run=True only validates, selects and sizes the workspace.");

  m.def(
      "dropout_keep_mask",
      [](uintptr_t out, int64_t B, int64_t H, int64_t N, int64_t S, float p, uint64_t seed, uint64_t offset) {
        Status st = dropout_keep_mask(reinterpret_cast<uint8_t*>(out), B, H, N, S, p, seed, offset);
        if (!st.ok()) raise(st);
      },
      nb::arg("out"), nb::arg("B"), nb::arg("H"), nb::arg("N"), nb::arg("S"), nb::arg("p"), nb::arg("seed"),
      nb::arg("offset"), "Fill a contiguous uint8 [B, H, N, S] buffer with the kernels' dropout keep-mask.");

  m.def("cpu_isa", &cpu_isa, "The CPU instruction set the CPU kernel dispatches to.");
  m.def("cuda_compiled", &cuda_compiled, "Whether CUDA kernels were compiled into this build.");
}
