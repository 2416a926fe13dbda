"""The Hugging Face hub, asked once whether it can be reached: without a network its libraries (timm's
weights, `datasets`, `transformers`) retry every request for about a minute before they look in their
cache. When the hub cannot be reached they are put in offline mode, so a cached file loads at once and
a missing one fails in seconds."""

import functools
import logging
import os
import socket
import sys
from urllib.parse import urlparse

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
