// The Python module of an ahead-of-time build (CAAD_BUILD_EXT=1 pip install .): importing
// caad_kernels._C loads this library, whose static initialisers register the ops.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "caad native kernels (ahead-of-time build)";
#ifdef CAAD_WITH_CUDA
  m.attr("DEVICE_KINDS") = pybind11::make_tuple("cpu", "cuda");
#else
  m.attr("DEVICE_KINDS") = pybind11::make_tuple("cpu");
#endif
}
