"""The TASKS registry's built-in entries: `task=classification` (the default), `multilabel`,
`regression`, `segmentation` and `language_model`. A task of your own: subclass `trainer.Task`, give it
`loss(outputs, batch)` and `metrics()`, and register it with `@TASKS.register("name")` in a module named
in `imports:`.

The built-in tasks import torchmetrics inside `metrics()`, not with their modules: it takes three seconds
and ~300 MB to import (it loads scipy, matplotlib and transformers where they are installed), and only
training and evaluation build metrics; a config check, predict and serve never do."""

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

__all__ = [
    "TASKS",
    "Answers",
    "Batch",
    "DataInfo",
    "ExportWrapper",
    "FlipAverage",
    "MaskAnswers",
    "NamesTokens",
    "SequenceInputs",
    "Task",
    "TestTimeAugmentation",
    "option",
]
