"""The package version, in one place: pyproject.toml reads it ([tool.setuptools.dynamic]) and ladder_kernels
re-exports it. Keep this a plain literal assignment so that setuptools reads it without importing the package
(or torch)."""

__version__ = "0.1.0"
