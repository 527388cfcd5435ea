"""What a job is asked to do: the typed distillation config, the shared CLI that builds it from a
recipe and overrides, and the plan (prompt counts, steps) printed before a run starts."""
