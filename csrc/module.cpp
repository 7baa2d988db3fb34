// The Python module sn_cuda._C. It has no functions: importing it loads this shared library,
// whose static initializers register the CUDA kernels of the sn_cuda ops with the dispatcher
// (TORCH_LIBRARY_IMPL in csrc/cuda/*.cu). The op schemas are sn_cuda/schemas.py's.
// Only <Python.h> here, so this file builds in a second and never needs pybind11.
#include <Python.h>

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "CUDA kernels of the sn_cuda ops, registered with torch's dispatcher on import.",  // m_doc
      -1,    // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}

}  // extern "C"
