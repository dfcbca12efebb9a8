// The Python module sparsekern._C is empty: importing it loads this shared library, whose
// TORCH_LIBRARY_IMPL blocks register the kernels for ops defined in sparsekern/ops.py.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
