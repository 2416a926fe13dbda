"""The Hugging Face hub, asked once whether it can be reached: without a network its libraries (timm's
weights, `datasets`, `transformers`) retry every request for about a minute before they look in their
cache. When the hub cannot be reached they are put in offline mode, so a cached file loads at once and
a missing one fails in seconds."""

import functools
import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

from trainer.core.errors import UserError, require

log = logging.getLogger("trainer")
TRUE = {"1", "on", "true", "yes"}


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint (HF_ENDPOINT, else huggingface.co) opens within
    `timeout_s`; False at once when offline mode is already asked for (HF_HUB_OFFLINE)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def offline_unless_reachable() -> bool:
    """Puts the hub's libraries in offline mode when the hub cannot be reached; returns whether they are
    offline. The libraries read the setting when imported, so one already imported is told as well."""
    if hub_reachable():
        return False
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in TRUE:
        log.info("the Hugging Face hub cannot be reached: using its local cache only (HF_HUB_OFFLINE=1)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, name in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
    ):
        if module in sys.modules:
            setattr(sys.modules[module], name, True)
    return True


def cache_folder() -> Path:
    """Where the hub's libraries keep what they downloaded (HF_HUB_CACHE, else HF_HOME's hub/)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def not_available(key: str, name: str, error: BaseException, local: str = "") -> UserError:
    """The one line for a hub name that could not be had: offline with an empty cache, or a name the hub
    does not know."""
    why = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE
    fix = (
        f"offline: fill the cache {cache_folder()} on a machine with network (or set HF_HUB_CACHE)"
        if offline
        else "check the name on huggingface.co"
    )
    return UserError(
        f"{key}: cannot get {name!r} ({why}); {fix}, or give a local folder{f' ({local})' if local else ''}"
    )


def transformers_library(what: str) -> ModuleType:
    """`transformers` (the `hf` extra), told to keep quiet: its progress bars and advice would fill the
    run's log; what matters is said by the caller, in one line."""
    library = require("transformers", what, "hf")
    library.utils.logging.set_verbosity_error()
    library.utils.logging.disable_progress_bar()
    # A renamed property's notice, raised whenever peft or torch.jit.trace reads every attribute of a
    # model: nothing a user of ours can act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    return library
