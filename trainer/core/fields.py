"""A settings dataclass's field with its default, its range check and one line of meaning, written
once, side by side: `check_fields` applies the checks, and the configuration reference is generated
from the same fields."""

import dataclasses
from collections.abc import Callable
from typing import Any

from trainer.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Check:
    """A test a valid value passes, and what such a value is, in words (for the error and the docs)."""

    test: Callable[[Any], bool]
    needs: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except TypeError:  # e.g. a list where a number belongs
            return False


def setting(default: Any, meaning: str, check: Check | None = None) -> Any:
    """A dataclass field: its default (a list is copied for each instance), what it means, and the
    check a value must pass."""
    metadata = {"meaning": meaning, "check": check}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def at_least(low: float, note: str = "") -> Check:
    return Check(lambda value: value >= low, f"{low:g}{f' ({note})' if note else ''} or more")


def one_of(*choices: Any) -> Check:
    return Check(lambda value: value in choices, f"one of {', '.join(map(str, choices))}")


def optional(check: Check, null: str = "not set") -> Check:
    """The check, or null (None), which means `null`."""
    return Check(lambda value: value is None or check(value), f"null ({null}) or {check.needs}")


POSITIVE = Check(lambda value: value > 0, "positive")


def check_fields(settings: Any, prefix: str) -> None:
    """Every field's check, in order (a nested settings dataclass in its turn); the first that fails is
    the user's mistake, in one line that names the key."""
    for field in dataclasses.fields(settings):
        check, value = field.metadata.get("check"), getattr(settings, field.name)
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{prefix}{field.name}.")
        elif check is not None and not check(value):
            raise UserError(f"{prefix}{field.name}: must be {check.needs}, got {value!r}")
