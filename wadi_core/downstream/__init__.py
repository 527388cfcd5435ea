"""Downstream tasks driven by a WaDi one-step student: ControlNet, DreamBooth, ReVersion.

Each task is trained against the multi-step teacher and then sampled with the teacher (N steps,
CFG) and with the one-step student; ``sampling`` and ``geometry`` are shared. Pure torch +
diffusers, like the rest of ``wadi_core``; the jobs in ``jobs/`` add CLI and MLflow.
"""
