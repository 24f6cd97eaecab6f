"""HTTP recommendation server (FastAPI) over a ``padrec_vllm.engines.Engine``.

Depends on ``padrec_vllm``, never the reverse. ``create_app(settings)`` builds the app
(server/app.py); ``server.main.serve`` runs it. The API and settings are described in
docs/SERVER.md.

``padrec serve`` reaches the server through the CLI's one seam, the entry-point group
``padrec.commands`` (pyproject.toml: ``serve = "server.cli:command"``; the contract is in
``padrec_vllm/cli.py``'s docstring). The CLI loads ``server.cli`` on every ``padrec`` call, so
this package imports its app lazily (``from server import create_app`` still works).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.app import create_app
    from server.settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from server.app import create_app

        return create_app
    if name == "Settings":
        from server.settings import Settings

        return Settings
    raise AttributeError(f"module 'server' has no attribute {name!r}")
