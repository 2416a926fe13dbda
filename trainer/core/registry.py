"""A registry is a dict from name to builder, filled by a decorator and read by config name; the six
the framework chooses from are defined here, at the bottom of the import graph.

An entry's parameters have their defaults in one place: its config file, conf/<group>/<name>.yaml (what
`--cfg job` prints). `build` fills the parameters it is not given from that file, so the Python API
(`MODELS.build("resnet", num_classes=10)`) builds what the command line builds. A builder's signature
holds the types and, as `Annotated[type, Check]`, the range each parameter must be in.

Each registry knows the module that registers its built-in entries and imports it on first look-up
(`names`, `get`, `check`, `build`, `in`): a user's `from trainer import MODELS` sees the built-ins, and
a command that never looks one up (`--help`, `--cfg job`) never imports them."""

import collections.abc
import importlib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from trainer.core.errors import UserError
from trainer.core.fields import Check

T = TypeVar("T")
# The config folder: one group folder per registry (conf/model/ for MODELS...), beside the package.
CONF = Path(__file__).resolve().parents[2] / "conf"


class Registry(Generic[T]):
    """Names to builders for one config group: `@MODELS.register("mynet")` adds one, `model=mynet`
    chooses it, and `build` calls it with its group file's parameters (checked first by `check`)."""

    def __init__(self, group: str, builtins: str | None = None, nested: bool = False) -> None:
        self.group = group  # the config group that chooses from this registry
        self.nested = nested  # its config files hold the options under the entry's name (logger=[a,b])
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
            if isinstance(builder, type):
                builder.registered_name = name  # a class knows the name it is chosen by (task=<name>)
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

    def check(
        self,
        name: str,
        params: Mapping[str, Any],
        provided: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
    ) -> None:
        """Fail now, not an hour in, on a parameter the builder does not take, lacks, or gets of the wrong
        type or range. `provided` names arguments the framework passes itself (the model to an optimizer);
        `optional`, those it passes unless the config gives them (what the data gives a model)."""
        builder = self.get(name)
        signature = inspect.signature(builder)
        accepted = [p for p in signature.parameters if p not in provided]
        takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        for key in params:
            if key not in accepted and not takes_any:
                raise UserError(
                    f"{self.group}.{key}: not a parameter of {self.group} '{name}'; "
                    f"its parameters are {', '.join(accepted)}"
                )
        hints = typing.get_type_hints(
            builder.__init__ if isinstance(builder, type) else builder, include_extras=True
        )
        for key, value in params.items():
            hint, checks = _unannotated(hints.get(key, Any))
            if not _matches(value, hint):
                raise UserError(f"{self.group}.{key}: expected {_type_name(hint)}, got {value!r}")
            for check in checks:
                if not check(value):
                    raise UserError(f"{self.group}.{key}: must be {check.needs}, got {value!r}")
        filled = {**self.defaults(name), **params}  # what build() gives the builder
        for key, p in signature.parameters.items():
            if (
                key not in filled
                and key not in provided
                and key not in optional
                and p.default is p.empty
                and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
            ):
                raise UserError(
                    f"{self.group}.{key}: missing; {self.group} '{name}' needs it "
                    f"(add {self.group}.{key}=... or put it in conf/{self.group}/{name}.yaml)"
                )

    def parameter_needs(self, name: str, key: str) -> str:
        """What a parameter takes, from the builder's annotation: its type and range ('' if unannotated)."""
        builder = self.get(name)
        hints = typing.get_type_hints(
            builder.__init__ if isinstance(builder, type) else builder, include_extras=True
        )
        if key not in hints:
            return ""
        hint, checks = _unannotated(hints[key])
        return ", ".join([_type_name(hint).replace(" | ", " or "), *(check.needs for check in checks)])

    def defaults(self, name: str) -> dict[str, Any]:
        """The entry's parameters as its config file sets them, resolved as far as the file alone allows
        (`${pretrained:...}` gives its default; a key that needs another group, or a required `???` one,
        is left out); {} for an entry without a file (a user's own)."""
        path = CONF / self.group / f"{name}.yaml"
        if not path.is_file():
            return {}
        from omegaconf import OmegaConf

        register_resolvers()
        loaded = OmegaConf.load(path)
        section = loaded.get(name) if self.nested else loaded
        if section is None:
            return {}
        wrapper = OmegaConf.create({self.group: section})  # `${dataset.image_size}` resolves inside it
        found = {}
        for key in section:
            try:
                value = OmegaConf.select(wrapper, f"{self.group}.{key}", throw_on_missing=True)
            except Exception:  # noqa: BLE001 - required (???), or another group's value: not a default
                continue
            if key != "name":
                found[key] = (
                    OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                )
        return found

    def build(self, name: str, /, **kwargs: Any) -> T:
        """The entry, built with `kwargs` over the defaults in its config file."""
        builder = self.get(name)
        accepted = inspect.signature(builder).parameters
        filled = {k: v for k, v in self.defaults(name).items() if k in accepted}
        return builder(**{**filled, **kwargs})


def _unannotated(hint: Any) -> tuple[Any, tuple[Check, ...]]:
    """(the type, the range checks) of a hint that may be `Annotated[type, Check, ...]`."""
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return base, tuple(e for e in extras if isinstance(e, Check))
    return hint, ()


def _matches(value: Any, hint: Any) -> bool:
    """A shallow check of plain config values against a builder's type hints."""
    origin = typing.get_origin(hint) or hint
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
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


MODELS: Registry = Registry("model", builtins="trainer.models")
DATASETS: Registry = Registry("dataset", builtins="trainer.data")
OPTIMIZERS: Registry = Registry("optimizer", builtins="trainer.optim")
SCHEDULERS: Registry = Registry("scheduler", builtins="trainer.optim")
TASKS: Registry = Registry("task", builtins="trainer.tasks")
LOGGERS: Registry = Registry("logger", builtins="trainer.loggers", nested=True)
ENVS: Registry = Registry("env", builtins="trainer.rl")


# model name -> what its pretrained weights expect of their inputs ({"mean", "std", "image_size"}) from its
# model section: timm's pretrained config, a torchvision weights entry's transforms (trainer/models).
# In-memory tables of those libraries: nothing is read from disk or the network.
PREPROCESSING: dict[str, Callable[[Any], dict]] = {}


def preprocessing(model: Any, finetune: Any = None) -> dict | None:
    """What a pretrained model's inputs were (mean, std, image size), when its model section asks for
    pretrained weights (model.pretrained, model.weights) or it starts from finetune.checkpoint."""
    if model is None:
        return None
    MODELS._load_builtins()
    if model.get("name") not in PREPROCESSING:
        return None
    if not (
        model.get("pretrained")
        or model.get("weights")
        or (finetune is not None and finetune.get("checkpoint"))
    ):
        return None
    return PREPROCESSING[model.name](model) or None


def _pretrained(key: str, default: Any, *, _root_: Any) -> Any:
    """`${pretrained:mean,[0.5,0.5,0.5]}`: what a pretrained model expects (its mean, std or image
    size), else the default written there. The image datasets' config files use it."""
    from omegaconf import OmegaConf

    default = OmegaConf.to_container(default) if OmegaConf.is_config(default) else default
    value = (preprocessing(_root_.get("model"), _root_.get("finetune")) or {}).get(key, default)
    if isinstance(default, list) and len(value) != len(
        default
    ):  # grey images for an RGB model: the data's own
        return default
    return value


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("pretrained", _pretrained, replace=True)
