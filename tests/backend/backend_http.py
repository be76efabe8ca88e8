"""A real uvicorn server on a free loopback port, for the API tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hydrabrain.shared.serving import in_background


@contextmanager
def served(app) -> Iterator[str]:
    """Run an ASGI app under uvicorn on a free loopback port; yields its base URL."""
    with in_background(app, startup_timeout_s=60) as url:
        yield url
