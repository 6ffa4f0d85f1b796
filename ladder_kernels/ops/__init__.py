"""One file per op: torch.library definition, fake implementation, autograd, backend dispatch, reference."""
from .nf4_matmul import nf4_matmul

__all__ = ["nf4_matmul"]
