"""Sweeps that survive: Hydra multirun jobs that record how they ended, resume when run again, and a
summary of them all (CSV, Markdown, a chart). `python -m trainer -m ...` runs `jobs.run_sweep_job` for
each job; Hydra calls `summary.SweepSummary`."""
