// Python module entry point of ladder_kernels._C. The kernels register themselves as torch ops
// (namespace ladder_cpu) from their own files through TORCH_LIBRARY_FRAGMENT; importing this module
// is what loads them.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ladder-kernels C++ CPU kernels (registered as torch.ops.ladder_cpu.*)";
}
