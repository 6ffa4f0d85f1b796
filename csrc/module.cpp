// Python module entry point of ladder_kernels._C. The kernels register themselves as torch ops
// (namespace ladder_cpu) from their own files through TORCH_LIBRARY_FRAGMENT; importing this module
// is what loads them. pybind11 alone, not torch/extension.h: this file needs no ATen, and the build is
// a third as long.
#include <pybind11/pybind11.h>

#include <string>

std::string nf4_cpu_isa();  // csrc/nf4_matmul.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ladder-kernels C++ CPU kernels (registered as torch.ops.ladder_cpu.*)";
  m.def("cpu_isa", &nf4_cpu_isa,
        "The instruction set the NF4 kernels take now: avx512, avx2 or scalar (LADDER_KERNELS_CPU_ISA honoured)");
}
