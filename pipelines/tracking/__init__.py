"""MLflow: a client that never takes a job down, model registration, and the one-step model that
MLflow loads from code (``one_step_model.py``, copied by file path)."""
