"""Memory and speed without a GPU: the tensor-memory tracker, the methods compared, the planner, the benchmark.

memory.PeakMemoryTracker counts live tensor storages (real or fake); methods.MethodTrainer builds and steps any
method; planner.plan runs that step on fake tensors; bench.run_bench runs it for real, side by side.
"""

from ladder_kernels.planning.memory import PeakMemoryTracker
from ladder_kernels.planning.methods import MethodTrainer, build_method_model, make_qlora_lk_model, make_qlora_model
from ladder_kernels.planning.planner import MemoryPlan, max_seq_len, plan, plan_with_max_seq_len

__all__ = [
    "PeakMemoryTracker",
    "MethodTrainer",
    "build_method_model",
    "make_qlora_model",
    "make_qlora_lk_model",
    "MemoryPlan",
    "plan",
    "max_seq_len",
    "plan_with_max_seq_len",
]
