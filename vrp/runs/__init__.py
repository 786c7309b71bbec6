"""Runs: the one batch loop that every writer of a run shares (capture runs and interventions)."""

from vrp.runs.loop import BatchOutcome, run_loop

__all__ = ["BatchOutcome", "run_loop"]
