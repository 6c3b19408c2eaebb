"""The replica's own state that handlers consult: whether it is draining for shutdown."""

from __future__ import annotations


class Lifecycle:
    """Set at shutdown; read by every new request and by readiness."""

    def __init__(self) -> None:
        self.draining = False
