"""How a global batch is shared among the ranks of a world of any size (pure Python: Ray Data tasks
and the config import it without torch)."""

from __future__ import annotations

__all__ = ["rank_slice"]


def rank_slice(global_batch: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s share of a global batch at world size ``world``: as even as
    it can be (sizes differ by at most one prompt), so any world size up to
    the global batch keeps it; the losses are weighted by sample count (``DeepSpeedUpdater``)."""
    if not 0 <= rank < world <= global_batch:
        raise ValueError(f"rank {rank} of {world} cannot take a share of a global batch of {global_batch}")
    return rank * global_batch // world, (rank + 1) * global_batch // world
