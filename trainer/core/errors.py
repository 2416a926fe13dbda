"""The one exception type that means "the user's mistake": exit 2 with one plain line, no traceback;
and the one way an optional extra's library is asked for."""

import importlib
from types import ModuleType


class UserError(Exception):
    """A mistake in config, data or files that the person can fix; the message says how."""


def not_installed(what: str, module: str, extra: str, hint: str = "") -> str:
    """`what` (the key or command that chose it) needs `module`: the line that says which extra to install."""
    return f'{what}: needs {module}, which is not installed: pip install -e ".[{extra}]"' + (
        f" ({hint})" if hint else ""
    )


def require(module: str, what: str, extra: str, hint: str = "") -> ModuleType:
    """An optional extra's library, imported, or a UserError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(not_installed(what, module, extra, hint)) from None
