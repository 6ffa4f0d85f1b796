"""Memory and speed without a GPU: the tensor-memory tracker, the methods compared, the planner, the benchmark."""
