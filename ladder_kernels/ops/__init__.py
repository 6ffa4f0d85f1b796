"""One file per op: torch.library definition, fake implementation, autograd, backend dispatch, reference."""

from ladder_kernels.ops.nf4_matmul import nf4_matmul

__all__ = ["nf4_matmul"]
