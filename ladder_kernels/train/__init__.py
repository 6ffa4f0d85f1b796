"""Fine-tuning: configuration, data, backbones, the training run, checkpoints, evaluation and reports.

The route of a run: config.FinetuneConfig -> run.TrainingRun (data.load_dataset, backbones.resolve_model,
run.build_model) -> TrainingRun.run (one optimizer step at a time, checkpoint.save_checkpoint, distributed for
DDP) -> evaluate.evaluate -> run_dir.save_adapter -> report.write_reports.
"""

from ladder_kernels.train.config import FinetuneConfig, ladder_config
from ladder_kernels.train.data import Dataset, Example, load_dataset
from ladder_kernels.train.evaluate import evaluate, greedy_complete
from ladder_kernels.train.run import TrainingRun, build_model, warmup_cosine
from ladder_kernels.train.run_dir import load_finetuned

__all__ = [
    "FinetuneConfig",
    "ladder_config",
    "Dataset",
    "Example",
    "load_dataset",
    "evaluate",
    "greedy_complete",
    "TrainingRun",
    "build_model",
    "warmup_cosine",
    "load_finetuned",
]
