"""The process's resident memory from /proc/self/status (Linux), for the CPU memory benchmarks."""

from __future__ import annotations

from pathlib import Path

__all__ = ["status_bytes", "reset_peak_rss"]


def status_bytes(field: str) -> int:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; return that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")
