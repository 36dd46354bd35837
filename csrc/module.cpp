// The Python module `fused_poolformer._C`.  Importing it loads the shared library, whose
// static initializers register the operators with the dispatcher.  It holds one function,
// the forward's fast entry from Python (fused_poolformer.ops.pool_mixer):
//
//   forward(x, weight, bias, layer_scale, res_scale, sample_scale, num_groups, pool_size,
//           eps) -> y, or None
//
// It calls the operator through the dispatcher (so autograd, the profiler and every
// dispatch key see one pool_mixer_forward, exactly as through torch.ops), but reads its
// arguments without the boxed schema-driven conversion that torch.ops performs and wraps
// only y: a few microseconds less per call, which is the late stages' whole budget.  It
// returns None -- and the caller takes torch.ops -- for anything it does not read itself:
// a tensor subclass or an active __torch_function__ mode (which must see the call), or an
// argument of another type (whose error torch.ops words).
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "host.h"

namespace fused_poolformer {
namespace {

// A plain tensor (or Parameter): true and `out` set.  None: true and `out` empty.
bool read_optional_tensor(PyObject* obj, OptionalTensor& out) {
  if (obj == Py_None) return true;
  if (!THPVariable_CheckExact(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

bool read_int(PyObject* obj, int64_t& out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  return overflow == 0 && !(out == -1 && PyErr_Occurred());
}

// The GIL is released around the operator, as torch's own bindings do.
class ReleasedGil {
 public:
  ReleasedGil() : state_(PyEval_SaveThread()) {}
  ~ReleasedGil() { PyEval_RestoreThread(state_); }

 private:
  PyThreadState* state_;
};

PyObject* forward(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9) {
    PyErr_Format(PyExc_TypeError, "_C.forward takes 9 arguments (%zd given)", nargs);
    return nullptr;
  }
  if (at::impl::torch_function_mode_enabled() || !THPVariable_CheckExact(args[0])) Py_RETURN_NONE;
  std::array<OptionalTensor, 5> vectors;
  for (int i = 0; i < 5; ++i) {
    if (!read_optional_tensor(args[1 + i], vectors[i])) Py_RETURN_NONE;
  }
  int64_t num_groups = 0, pool_size = 0;
  if (!read_int(args[6], num_groups) || !read_int(args[7], pool_size) ||
      !PyFloat_CheckExact(args[8])) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  const double eps = PyFloat_AS_DOUBLE(args[8]);
  at::Tensor y;
  {
    ReleasedGil released;
    y = std::get<0>(forward_handle().call(THPVariable_Unpack(args[0]), vectors[0], vectors[1],
                                          vectors[2], vectors[3], vectors[4], num_groups,
                                          pool_size, eps));
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&forward)),
     METH_FASTCALL, "y of fused_poolformer::pool_mixer_forward, or None (see csrc/module.cpp)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace fused_poolformer

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fused_poolformer operator library", -1,
      fused_poolformer::methods,
  };
  return PyModule_Create(&module_def);
}
}
