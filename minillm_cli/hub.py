"""Whether the Hugging Face Hub can be reached, asked once per process before the first Hub lookup.

Without a network (a cluster's compute node, say) huggingface_hub retries each request five times
(~49 s) and logs every retry before a name that is not a local folder fails. So before the first
lookup we try one TCP connection to the Hub's host (HF_ENDPOINT, or huggingface.co); when that
fails the Hub libraries are switched to offline mode for the rest of the process: a model or
dataset in the local Hub cache still loads, at once, and a missing one fails at once with our own
one-line error. Behind a proxy (HTTPS_PROXY and the like) nothing is tried: the libraries' own
requests go through it, ours would not.
"""
from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")
# which variables put which lookups offline: HF_HUB_OFFLINE all of them; the others one library
_OFFLINE_FOR = {"hub": ("HF_HUB_OFFLINE",), "models": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
                "datasets": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
_OFFLINE_VARS = tuple(dict.fromkeys(v for names in _OFFLINE_FOR.values() for v in names))
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_REACHABLE: dict = {}  # endpoint -> bool, once per process


def offline(kind: str = "hub") -> bool:
    """Whether lookups of `kind` are in offline mode (set by the user, or by `check_reachable`):
    "hub" every library's; "models" (transformers, peft) or "datasets" one library's."""
    return any(os.environ.get(k, "").lower() in _TRUE for k in _OFFLINE_FOR[kind])


def check_reachable(timeout: float = 3.0) -> bool:
    """False, with the Hub libraries switched to offline mode, when the Hub cannot be reached (or
    offline mode is on already for all of them); True otherwise. Call before a name is looked up
    on the Hub. (HF_DATASETS_OFFLINE alone leaves model lookups online, and their retries: the
    connection is still tried.)"""
    if offline("hub"):
        return False
    if any(os.environ.get(k) for k in _PROXY_VARS):
        return True
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if endpoint not in _REACHABLE:
        url = urlparse(endpoint)
        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname or "", port), timeout=timeout).close()
            _REACHABLE[endpoint] = True
        except (OSError, ValueError):  # no route, no name resolution, refused, timed out; a bad port
            _REACHABLE[endpoint] = False
    if not _REACHABLE[endpoint]:
        go_offline()
    return _REACHABLE[endpoint]


def looks_like_path(name: str) -> bool:
    """A name no Hub id can be (/abs, ./rel, ../rel, ~/home): a local path, there or not."""
    from pathlib import Path

    return Path(name).is_absolute() or name.startswith((".", "~"))


def before_lookup(name: str) -> None:
    """Call before `name` (a model, adapter or dataset) is loaded: one that is no local path is
    looked up on the Hub, so find out first whether the Hub can be reached (a missing path is no
    Hub id: it costs no probe)."""
    from pathlib import Path

    if not Path(name).expanduser().exists() and not looks_like_path(name):
        check_reachable()


def go_offline() -> None:
    """Offline mode for this process: the environment (for modules not imported yet) and the
    flags that huggingface_hub and datasets read at import (for those already imported)."""
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True
