"""The training side of a run: the Ray Train worker loop, its DeepSpeed engines, checkpoints
(write, verify, resume), and the ControlNet trainer."""
