"""The TASKS registry's built-in entries: `task=classification` (the default), `multilabel`,
`regression` and `segmentation`. A task of your own: subclass `trainer.tasks.Task` and register it with
`@TASKS.register("name")` in a module named in `imports:`."""

from trainer.core.registry import TASKS
from trainer.tasks import classification, language_model, multilabel, regression, segmentation  # noqa: F401  (registers the built-in tasks)
from trainer.tasks.base import Batch, DataInfo, Evaluation, FlipAverage, Task, option

__all__ = ["TASKS", "Batch", "DataInfo", "Evaluation", "FlipAverage", "Task", "option"]
