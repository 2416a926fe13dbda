"""The one exception type that means "the user's mistake": exit 2 with one plain line, no traceback."""


class UserError(Exception):
    """A mistake in config, data or files that the person can fix; the message says how."""
