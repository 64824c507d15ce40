"""Where listeners bind by default: loopback on a machine, every interface in a container.

The images set ``FEDPROMPT_BIND=0.0.0.0``: a container's loopback is its own, so a listener there serves
nobody (``docker run -p 9094:9094`` would reach nothing) and a health port there fails its probe. Outside a
container nothing is set and every default stays on 127.0.0.1: exposing a port is the operator's choice.
"""

from __future__ import annotations

import os

BIND_ENV = "FEDPROMPT_BIND"


def bind_host() -> str:
    return os.environ.get(BIND_ENV) or "127.0.0.1"


def health_default(port: int) -> str | None:
    """A health port by default only where ``FEDPROMPT_BIND`` is set (the images); else none unless asked."""
    host = os.environ.get(BIND_ENV)
    return f"{host}:{port}" if host else None
