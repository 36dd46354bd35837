// The Python module `fused_poolformer._C`.  It holds no functions: importing it loads the
// shared library, whose static initializers register the operators with the dispatcher.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fused_poolformer operator library", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
