"""The HTTP service (`ovdet serve`): detection over HTTP, stored vocabularies, cross-request batching, Label Studio.

`create_app(detector, settings)` builds the FastAPI app; FastAPI is imported only when this package is used.
"""

from __future__ import annotations

from ovdet.service.settings import ServeSettings, ServiceError

__all__ = ["ServeSettings", "ServiceError", "create_app"]


def create_app(*args, **kwargs):
    """The FastAPI app serving `detector` (see ovdet.service.app.create_app)."""
    from ovdet.service.app import create_app as _create

    return _create(*args, **kwargs)
