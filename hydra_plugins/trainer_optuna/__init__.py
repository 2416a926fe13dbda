"""The framework's Hydra plugin: a resumable Optuna sweeper (see resumable_optuna.py)."""
