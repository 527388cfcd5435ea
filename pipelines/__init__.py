"""Ray / DeepSpeed / MLflow wiring around ``wadi_core``."""
