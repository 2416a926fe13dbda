"""The TASKS registry's built-in entries: `task=classification` (the default), `multilabel`,
`regression`, `segmentation` and `language_model`. A task of your own: subclass `trainer.Task`, give it
`loss(outputs, batch)` and `metrics()`, and register it with `@TASKS.register("name")` in a module named
in `imports:`."""

from trainer.core.registry import TASKS
from trainer.tasks import classification, language_model, multilabel, regression, segmentation  # noqa: F401
from trainer.tasks.abilities import (
    Answers,
    ExportWrapper,
    FlipAverage,
    MaskAnswers,
    NamesTokens,
    SequenceInputs,
    TestTimeAugmentation,
)
from trainer.tasks.base import Batch, DataInfo, Task, option
from trainer.tasks.metrics import MetricSet

__all__ = [
    "TASKS",
    "Answers",
    "Batch",
    "DataInfo",
    "ExportWrapper",
    "FlipAverage",
    "MaskAnswers",
    "MetricSet",
    "NamesTokens",
    "SequenceInputs",
    "Task",
    "TestTimeAugmentation",
    "option",
]
