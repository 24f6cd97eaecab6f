"""Server overhead: the time a /recommend call spends outside the engine.

Starts the real app under uvicorn on 127.0.0.1 in a child process (as deployed; the one
local-server helper, ``benchmarks.local_server``), sends ``--requests`` sequential POST
/recommend calls over HTTP (httpx, keep-alive) and reports, per request:

- ``round trip``: what the client measured (send to last byte);
- ``engine``: the wall time the server spent awaiting the engine (``latency_ms.engine``);
- ``overhead = round trip - engine``: HTTP parsing, validation, prompt building, filtering and
  filling, metrics, JSON encoding and the loopback socket. This charges the client's own cost
  and any CPU contention to the server too, so the figure is an upper bound;
- ``in-server overhead = app time - engine``, where app time is the ``Server-Timing: app``
  header (request arrival in the app to response headers): the server's own work, without
  the socket and the client.

``--engine null`` swaps the engine for one that answers instantly with a fixed list: then all
of the round trip is overhead, without the engine competing for the CPU.

    python -m benchmarks.server_overhead --artifacts artifacts/demo-Beauty [--engine reference]

Needs the dev extra (httpx); run it from the repository root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.local_server import local_server

TARGET_P50_MS = 2.0
ENGINES = ("reference", "vllm", "null")


class NullEngine:
    """Answers every prompt at once with the same three catalog items."""

    name = "null"
    num_draft_tokens = 0
    max_model_len = 1 << 30

    def __init__(self, settings):
        from padrec_vllm.catalog.catalog import Catalog
        from padrec_vllm.engines import EngineConfig, SpecSchedule

        self.config = EngineConfig(artifacts=settings.artifacts, head=None)
        self.schedule = SpecSchedule.off()
        catalog = Catalog.load(settings.artifacts)
        self.tokens = catalog.completion_ids(sorted(catalog.item_to_sid)[:3], finished=True)

    max_draft_tokens = 0  # no head: nothing to calibrate

    async def start(self, warmup_prompts, max_new_tokens, constraint=None):
        return None

    async def set_schedule(self, schedule):
        self.schedule = schedule

    async def generate(self, prompt, max_new_tokens, constraint=None):
        from padrec_vllm.engines import RequestResult

        forwards = len(self.tokens) - 1
        return RequestResult(
            tokens=self.tokens, target_forwards=forwards, plain_forwards=forwards
        )

    async def close(self):
        pass

    def alive(self) -> bool:
        return True

    def prometheus_text(self) -> bytes:
        return b""


def _pct(values: list[float], q: int) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def serve(engine: str) -> None:
    """Child process: the app under uvicorn, as ``padrec serve`` runs it, settings from
    ``PADREC_*``, without access logs; ``engine`` null swaps in ``NullEngine``."""
    import uvicorn

    from server.app import create_app
    from server.engines import build_engine
    from server.settings import Settings

    settings = Settings()
    factory = NullEngine if engine == "null" else build_engine
    uvicorn.run(
        create_app(settings, engine_factory=factory),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
    )


def _setting(value) -> str:
    """A ``Settings`` value as its ``PADREC_*`` environment string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def run(
    artifacts: Path,
    engine: str,
    requests: int,
    k: int,
    history: int,
    warmup: int = 20,
    log_path: Path | None = None,
    **overrides,
) -> dict[str, float]:
    """Serve in a child process (so the client does not share the server's CPU time and GIL);
    ``overrides`` are server settings (``speculative=False``, ...)."""
    import httpx

    from padrec_vllm.catalog.catalog import Catalog

    settings = {
        "engine": "reference" if engine == "null" else engine,
        "calibration_requests": 0,
        **overrides,
    }
    env = {f"PADREC_{name.upper()}": _setting(v) for name, v in settings.items()}
    log_path = log_path or Path(tempfile.gettempdir()) / "padrec-server-overhead.log"
    command = (sys.executable, "-m", "benchmarks.server_overhead", "--serve", engine)
    rtt, eng, handler, app = [], [], [], []
    with (
        local_server(artifacts, log_path, env=env, command=command) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        items = sorted(Catalog.load(artifacts).item_to_sid)
        for i in range(warmup + requests):
            body = {"history": [items[(i * 7 + j) % len(items)] for j in range(history)], "k": k}
            t0 = time.perf_counter()
            r = client.post("/recommend", json=body)
            t1 = time.perf_counter()
            r.raise_for_status()
            if i < warmup:
                continue
            lat = r.json()["latency_ms"]
            rtt.append((t1 - t0) * 1e3)
            eng.append(lat["engine"])
            handler.append(lat["total"] - lat["engine"])
            app_ms = float(r.headers["server-timing"].split("dur=")[1])
            app.append(app_ms - lat["engine"])
    overhead = [a - b for a, b in zip(rtt, eng)]
    return {
        "requests": requests,
        "rtt_p50_ms": statistics.median(rtt),
        "engine_p50_ms": statistics.median(eng),
        "overhead_p50_ms": statistics.median(overhead),
        "overhead_p90_ms": _pct(overhead, 90),
        "overhead_p99_ms": _pct(overhead, 99),
        "handler_overhead_p50_ms": statistics.median(handler),
        "in_server_overhead_p50_ms": statistics.median(app),
        "in_server_overhead_p90_ms": _pct(app, 90),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.server_overhead", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--artifacts", type=Path)
    p.add_argument("--engine", default="reference", choices=ENGINES)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--k", type=int, default=10, help="items per recommendation")
    p.add_argument("--history", type=int, default=20, help="history items per request")
    p.add_argument("--speculative", default="true", choices=["true", "false"])
    p.add_argument("--serve", choices=ENGINES, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.artifacts is None:
        p.error("the following arguments are required: --artifacts")
    res = run(
        args.artifacts,
        args.engine,
        args.requests,
        args.k,
        args.history,
        speculative=args.speculative == "true",
    )
    print(f"engine={args.engine} requests={res['requests']} k={args.k} history={args.history}")
    print(f"round trip p50 {res['rtt_p50_ms']:.3f} ms, engine p50 {res['engine_p50_ms']:.3f} ms")
    print(
        f"server overhead (round trip - engine) p50 {res['overhead_p50_ms']:.3f} ms, "
        f"p90 {res['overhead_p90_ms']:.3f} ms, p99 {res['overhead_p99_ms']:.3f} ms"
    )
    print(
        f"in-server overhead (Server-Timing app - engine) p50 "
        f"{res['in_server_overhead_p50_ms']:.3f} ms, p90 {res['in_server_overhead_p90_ms']:.3f} ms"
    )
    handler_p50 = res["handler_overhead_p50_ms"]
    print(f"in-handler overhead (latency_ms.total - engine) p50 {handler_p50:.3f} ms")
    for name, key in (
        ("in-server", "in_server_overhead_p50_ms"),
        ("round-trip", "overhead_p50_ms"),
    ):
        verdict = "under" if res[key] < TARGET_P50_MS else "OVER"
        print(f"p50 {name} overhead {res[key]:.3f} ms: {verdict} the {TARGET_P50_MS:.0f} ms target")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
