"""Builds the C++ CPU kernels (csrc/*.cpp) into ladder_kernels._C when torch is importable at build time.

`pip install --no-build-isolation .` (what the Makefile runs) uses the torch already installed, so the
extension matches it. Without torch or a compiler the package still installs; ladder_kernels then builds
the extension just-in-time on first use, or falls back to the pure-PyTorch path with one warning.
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext_modules = [
        CppExtension(
            "ladder_kernels._C",
            sources,
            extra_compile_args=["-O3", "-fopenmp", "-march=x86-64-v2"] if os.uname().machine == "x86_64" else ["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
except ImportError:  # no torch at build time: the JIT path takes over at run time
    pass

setup(ext_modules=ext_modules, cmdclass=cmdclass)
