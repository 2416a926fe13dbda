"""Where metrics go: the `logger` config group, several at once (`logger=[tensorboard,mlflow]`). Each
module registers one logger in LOGGERS; metric_log.MetricLog hands every one the same metrics at
the same steps. The loop knows none of them by name."""

from trainer.loggers import csv_file, mlflow_tracker, tensorboard, wandb_tracker  # noqa: F401  (registration)
