"""``padrec serve``: the server's command, registered through the CLI's one seam.

pyproject.toml declares it in the entry-point group ``padrec.commands``
(``serve = "server.cli:command"``); ``padrec_vllm.cli`` loads every entry point of that group
and calls ``command(subparsers)``, which adds the ``serve`` subcommand and returns its handler.
Only argparse is imported here (it runs for every ``padrec`` call); the handler imports the
server.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from padrec_vllm.cli import positive_int

NAME = "serve"


def command(
    subparsers: argparse._SubParsersAction,
) -> Callable[[argparse.Namespace], None]:
    """Add ``serve`` to ``subparsers``; return its handler (``padrec.commands`` contract)."""
    srv = subparsers.add_parser(
        NAME, help="serve POST /recommend over an artifacts dir (flags override PADREC_* env)"
    )
    srv.add_argument(
        "--artifacts", default=None, help="artifacts directory (default: $PADREC_ARTIFACTS)"
    )
    srv.add_argument(
        "--host", default=None, help="bind address (default: $PADREC_HOST or 127.0.0.1)"
    )
    srv.add_argument(
        "--port", type=positive_int, default=None, help="port (default: $PADREC_PORT or 8000)"
    )
    srv.add_argument(
        "--engine",
        default=None,
        choices=["vllm", "reference"],
        help="default: $PADREC_ENGINE or vllm",
    )
    srv.set_defaults(cpu_preload=uses_vllm)
    return run


def uses_vllm(args: argparse.Namespace) -> bool:
    """Whether ``serve`` runs the vLLM engine (``--engine``, else ``PADREC_ENGINE``, else vllm):
    then ``padrec`` preloads vLLM's CPU libraries first (``padrec_vllm.cli.main``)."""
    import os

    return (args.engine or os.environ.get("PADREC_ENGINE", "vllm")).strip().lower() == "vllm"


def run(args: argparse.Namespace) -> None:
    """Serve until interrupted; flags that were given override ``PADREC_*``."""
    from server.main import serve

    overrides = {"engine": args.engine} if args.engine else {}
    serve(args.artifacts, args.host, args.port, **overrides)
