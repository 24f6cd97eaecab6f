"""HTTP recommendation server (FastAPI) over a ``padrec_vllm.engine_api.Engine``.

Depends on ``padrec_vllm``, never the reverse. ``create_app(settings)`` builds the app;
``server.main.serve`` runs it. The API and settings are described in docs/SERVER.md.
"""

from server.app import create_app
from server.settings import Settings

__all__ = ["Settings", "create_app"]
