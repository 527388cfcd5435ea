"""Evaluation on Ray: generating images from a model, metrics against a reference set, evaluation
runs over checkpoints, and the final evaluation that closes a distillation run."""
