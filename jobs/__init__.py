"""Entry points users run: ``python jobs/<name>.py ...`` (e.g. under ``ray job submit``) or
``python -m jobs.<name> ...`` from the repository root."""
