"""Where and how a job runs: joining or starting Ray, console lines, stop signals and preemption,
the run lease, preflight checks, and the collectives the workers agree through."""
