"""``serve``: what ``padrec serve --artifacts DIR [--host H] [--port P]`` runs.

Also ``python -m server.main`` (settings from ``PADREC_*`` only) and, for uvicorn's own CLI,
``uvicorn --factory server.main:app_from_env``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from padrec_vllm.cpu_runtime import preload_note, reexec_with_preload
from padrec_vllm.errors import UserError
from server.app import create_app
from server.checks import check
from server.settings import Settings


def serve(
    artifacts: str | Path | None = None,
    host: str | None = None,
    port: int | None = None,
    **overrides,
) -> None:
    """Run the server until interrupted. Arguments that are not None override ``PADREC_*``.

    Raises ``padrec_vllm.errors.UserError`` (before anything is loaded) for an invalid or
    missing setting, or when the artifacts directory, the head or the history limit cannot work.
    """
    import uvicorn

    given = {"artifacts": artifacts, "host": host, "port": port, **overrides}
    settings = load_settings(**{k: v for k, v in given.items() if v is not None})
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    check(settings)
    note = preload_note()
    if note:
        logging.getLogger("server").info(note)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        workers=1,
    )


def load_settings(**overrides) -> Settings:
    """``Settings`` from ``PADREC_*`` and ``overrides``; a one-line UserError when invalid."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"PADREC_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise UserError(f"invalid server settings: {problems}") from None


def app_from_env():
    """App factory for ``uvicorn --factory server.main:app_from_env`` (one worker). Runs the
    start-up check first: a problem is one line on stderr and exit status 2."""
    try:
        settings = load_settings()
        check(settings)
    except UserError as exc:
        print(f"padrec: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return create_app(settings)


def main() -> int:
    """``python -m server.main``: ``serve()``; a problem found before the start is one line on
    stderr and exit status 2 (as ``padrec serve``). Run as a process (``__main__``) with the vLLM
    engine on a CPU build of vLLM, the process first re-executes itself with vLLM's CPU libraries
    preloaded (``padrec_vllm.cpu_runtime``)."""
    try:
        serve()
    except UserError as exc:
        print(f"padrec: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import os

    if os.environ.get("PADREC_ENGINE", "vllm").strip().lower() == "vllm":
        reexec_with_preload(module="server.main")
    sys.exit(main())
