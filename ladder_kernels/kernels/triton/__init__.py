"""Triton kernels, one file per kernel family. Imported lazily: importing triton needs a GPU driver or
TRITON_INTERPRET=1 to launch anything."""
