"""A registry is a dict from name to builder, filled by a decorator and read by config name; the six
the framework chooses from are defined here, at the bottom of the import graph.

Each registry knows the module that registers its built-in entries and imports it on first look-up
(`names`, `get`, `check`, `build`, `in`): a user's `from trainer.core.registry import MODELS` sees the
built-ins, and a command that never looks one up (`--help`, `--cfg job`) never imports them."""

import collections.abc
import importlib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from trainer.core.errors import UserError

T = TypeVar("T")
# The config folder: one group folder per registry (conf/model/ for MODELS...), beside the package.
CONF = Path(__file__).resolve().parents[2] / "conf"


class Registry(Generic[T]):
    def __init__(self, group: str, builtins: str | None = None) -> None:
        self.group = group  # the config group that chooses from this registry
        self._builders: dict[str, Callable[..., T]] = {}
        self._builtins = builtins  # the module whose import registers the built-in entries

    def _load_builtins(self) -> None:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None
            importlib.import_module(module)

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ValueError(
                    f"{self.group} '{name}' is registered twice "
                    f"({self._builders[name].__module__} and {builder.__module__})"
                )
            self._builders[name] = builder
            return builder

        return add

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._builders

    def get(self, name: str) -> Callable[..., T]:
        self._load_builtins()
        if name not in self._builders:
            raise UserError(
                f"{self.group}.name: unknown {self.group} '{name}'; choose one of "
                f"{', '.join(self.names())} (e.g. {self.group}={self.names()[0]})"
            )
        return self._builders[name]

    def check(self, name: str, params: Mapping[str, Any], provided: tuple[str, ...] = ()) -> None:
        """Fail now, not an hour in, on a parameter the builder does not take or lacks.

        `provided` names arguments the framework passes itself (the model to an optimizer)."""
        signature = inspect.signature(self.get(name))
        accepted = [p for p in signature.parameters if p not in provided]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        for key in params:
            if key not in accepted and not takes_any:
                raise UserError(
                    f"{self.group}.{key}: not a parameter of {self.group} '{name}'; "
                    f"its parameters are {', '.join(accepted)}"
                )
        builder = self.get(name)
        hints = typing.get_type_hints(builder.__init__ if isinstance(builder, type) else builder)
        for key, value in params.items():
            if key in hints and not _matches(value, hints[key]):
                raise UserError(f"{self.group}.{key}: expected {_type_name(hints[key])}, got {value!r}")
        for key, p in signature.parameters.items():
            if (
                key not in params
                and key not in provided
                and p.default is p.empty
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
            ):
                raise UserError(
                    f"{self.group}.{key}: missing; {self.group} '{name}' needs it "
                    f"(add {self.group}.{key}=... or put it in conf/{self.group}/{name}.yaml)"
                )

    def build(self, name: str, /, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)


def _matches(value: Any, hint: Any) -> bool:
    """A shallow check of plain config values against a builder's type hints."""
    origin = typing.get_origin(hint) or hint
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    return not isinstance(origin, type) or isinstance(value, origin)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# Every model's own keys: where its first weights come from, what stays fixed, whose preprocessing it takes
MODEL_KEYS = ("checkpoint", "freeze", "data_config")


def builder_params(model_section: Mapping[str, Any]) -> dict[str, Any]:
    """A model section (plain: a config's, or a run's saved one) as its builder's parameters: without
    its name and the keys every model has (trainer.run.setup.build_model reads those)."""
    return {k: v for k, v in model_section.items() if k not in ("name", *MODEL_KEYS)}


MODELS: Registry = Registry("model", builtins="trainer.models")
DATASETS: Registry = Registry("dataset", builtins="trainer.data")
OPTIMIZERS: Registry = Registry("optimizer", builtins="trainer.optim")
SCHEDULERS: Registry = Registry("scheduler", builtins="trainer.optim")
TASKS: Registry = Registry("task", builtins="trainer.tasks")
LOGGERS: Registry = Registry("logger", builtins="trainer.loggers")
