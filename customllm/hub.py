"""Whether a name means the Hugging Face hub, and whether the hub can be reached now."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used right now, or None if a TCP probe succeeds.

    Checks `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`, then opens one connection to `HF_ENDPOINT`
    (or the HTTPS proxy when one is set) with a short timeout, so callers fail in seconds instead
    of sitting through the hub client's retries.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    error: list[str] = ["timed out"]

    def probe() -> None:  # in a thread: DNS lookups ignore socket timeouts
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            error.clear()
        except OSError as e:
            error[0] = str(e) or type(e).__name__

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive() or error:
        return f"cannot reach {host}:{port} ({error[0] if error else 'timed out'})"
    return None


def looks_like_path(name: str) -> bool:
    """True when `name` is meant as a filesystem path rather than a hub id `owner/name`."""
    if name.startswith((".", "/", "~", "\\")) or "\\" in name or os.path.isabs(name):
        return True
    parts = Path(name).parts
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists())
