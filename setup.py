"""Builds the C++ CPU kernels (csrc/*.cpp) into ladder_kernels._C when torch is importable at build time, and
ships the C++ sources in the package as ladder_kernels/csrc/ for the just-in-time build.

`pip install --no-build-isolation .` (what the Makefile runs) uses the torch already installed, so the
extension matches it. Without torch or a compiler the package still installs; ladder_kernels then builds
the extension just-in-time on first use from the shipped sources (ladder_kernels/csrc/, with ninja), or falls
back to the pure-PyTorch path with one warning.

csrc/ stays at the top of the repository (the sdist carries it through MANIFEST.in); only the wheel's build
tree gets the copy under ladder_kernels/csrc/, so the sources are never duplicated in git.
"""

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC_PATTERNS = ("*.cpp", "*.h", "*.hpp")


def csrc_files() -> list[str]:
    return sorted(f for pattern in CSRC_PATTERNS for f in glob.glob(os.path.join("csrc", pattern)))


class BuildPyWithCsrc(build_py):
    """build_py that also copies csrc/* into <build_lib>/ladder_kernels/csrc/ (not in editable installs: there
    ladder_kernels finds the repository's own csrc/)."""

    def _csrc_targets(self) -> list[tuple[str, str]]:
        if getattr(self, "editable_mode", False):
            return []
        target_dir = os.path.join(self.build_lib, "ladder_kernels", "csrc")
        return [(src, os.path.join(target_dir, os.path.basename(src))) for src in csrc_files()]

    def run(self):
        super().run()
        for src, dst in self._csrc_targets():
            self.mkpath(os.path.dirname(dst))
            self.copy_file(src, dst, preserve_mode=False)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [dst for _, dst in self._csrc_targets()]

    def get_source_files(self):
        return super().get_source_files() + csrc_files()


ext_modules, cmdclass = [], {"build_py": BuildPyWithCsrc}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext_modules = [
        CppExtension(
            "ladder_kernels._C",
            sources,
            # as ladder_kernels/kernels/cpu.py COMPILE_FLAGS (why: see there)
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"]
            + (["-march=x86-64-v2"] if os.uname().machine == "x86_64" else []),
            extra_link_args=["-fopenmp"],
        )
    ]
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
except ImportError:  # no torch at build time: the JIT path takes over at run time
    pass

setup(ext_modules=ext_modules, cmdclass=cmdclass)
