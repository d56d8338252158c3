"""Flywheel's HTTP API (FastAPI) and its serving state; ``serve`` is ``flywheel serve``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.settings import Settings

__all__ = ["serve"]


def serve(settings: Settings) -> None:
    """Run the API and the spamd listener until interrupted (see services.api.app.serve)."""
    from services.api.app import serve as _serve

    _serve(settings)
