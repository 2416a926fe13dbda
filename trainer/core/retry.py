"""Retrying what fails for passing reasons (a download), with exponential backoff and full jitter."""

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("trainer")
F = TypeVar("F", bound=Callable[..., Any])


def retry(attempts: int, base_delay: float, exceptions: tuple[type[BaseException], ...]) -> Callable[[F], F]:
    """Retries with exponential backoff and full jitter; the last failure propagates."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for attempt in range(1, attempts + 1):
                try:
                    return fn(*args, **kwargs)
                except exceptions as e:
                    if attempt == attempts:
                        raise
                    delay = random.uniform(0, base_delay * 2 ** (attempt - 1))
                    log.warning(
                        "%s failed (%s); try %d of %d in %.1f s", fn.__name__, e, attempt + 1, attempts, delay
                    )
                    time.sleep(delay)

        return wrapper  # type: ignore[return-value]

    return decorate
