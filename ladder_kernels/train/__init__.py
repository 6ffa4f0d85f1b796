"""Fine-tuning: configuration, data, backbones, the training run, checkpoints, evaluation and reports."""
