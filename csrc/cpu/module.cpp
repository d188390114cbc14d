// The Python module `igsp_kernels._C`. Importing it loads this shared library, whose static initialisers
// (TORCH_LIBRARY_IMPL blocks in the kernel folders) register the CPU kernels of the `igsp_kernels_cpp` ops
// with the dispatcher. It exposes no Python functions of its own: the ops are reached through
// torch.ops.igsp_kernels_cpp.*, whose schemas igsp_kernels/_cpp.py defines. Plain CPython API instead of
// pybind11 keeps this translation unit at ~1 s of compile time.
#include <Python.h>

static struct PyModuleDef igsp_cpp_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "CPU kernels of the igsp_kernels_cpp torch.library ops (registered on import).",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&igsp_cpp_module);
}
