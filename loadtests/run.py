"""Headless load tests of the padrec server: one bounded run, or a sweep over concurrency with
speculation on and off.

    # one run against a running server: report.json / report.md / locust CSV + HTML under --out
    python loadtests/run.py run --host http://127.0.0.1:8000 --users 4 --duration 30s \
        --dataset Beauty --out runs/loadtest-run

    # sweep: starts a local server (loopback) with PADREC_SPECULATIVE=true, then =false, and runs
    # every concurrency against each; sweep.json / sweep.md under --out
    python loadtests/run.py sweep --artifacts artifacts/demo-Beauty --users 1,4,16 --duration 30s \
        --out runs/loadtest-sweep

    # sweep against two running deployments (speculation on / off) instead
    python loadtests/run.py sweep --spec-host URL --plain-host URL --dataset Beauty ...

    # memory soak: a local server under steady load, RSS of it and its engine process sampled
    # (loadtests/soak.py); soak.json / soak.md / soak.png under --out
    python loadtests/run.py soak --artifacts artifacts/demo-Beauty --users 16 --duration 1h \
        --sample 30s --out runs/soak

Latency percentiles are locust's (client side, HTTP included). tau, acceptance and decode time per
token under load come from the server's /metrics, read before and after each run. Speedup at a
concurrency: requests/s with speculation over requests/s without, and p50 without over p50 with.
Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # a script: the checkout's benchmarks/ is not installed
    sys.path.insert(0, str(HERE.parent))

from benchmarks.local_server import local_server, local_server_process, wait_ready

LOCUSTFILE = HERE / "locustfile.py"
SERVER_COUNTERS = ("padrec_decode_tokens_total", "padrec_target_forwards_total",
                   "padrec_draft_tokens_total", "padrec_accepted_tokens_total",
                   "padrec_decode_seconds_total", "padrec_recommendations_total")


@dataclass
class RunResult:
    label: str
    users: int
    duration_s: float
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    tau: float | None = None  # decode tokens per target forward during the run (server)
    acceptance: float | None = None  # accepted / proposed drafts during the run (server)
    decode_ms_per_token: float | None = None  # server decode time per token during the run


# --- one run ------------------------------------------------------------------------------------

def parse_duration(text: str) -> float:
    """'30s', '2m', '1h30m' or plain seconds -> seconds."""
    units = {"h": 3600, "m": 60, "s": 1}
    total, number = 0.0, ""
    for ch in text.strip():
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in units and number:
            total, number = total + float(number) * units[ch], ""
        else:
            raise argparse.ArgumentTypeError(f"bad duration {text!r} (examples: 30s, 2m, 1h30m)")
    total += float(number) if number else 0.0
    if total <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive: {text!r}")
    return total


def scrape(host: str) -> dict[str, float] | None:
    """The server's padrec counters (see SERVER_COUNTERS), or None when /metrics is unreachable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(host.rstrip("/") + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    values = dict.fromkeys(SERVER_COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in values and not sample.labels:
                values[sample.name] = sample.value
    return values


def server_figures(before: dict | None, after: dict | None) -> dict[str, float | None]:
    """tau, acceptance and decode ms/token from two scrapes; None where nothing was counted."""
    if before is None or after is None:
        return {"tau": None, "acceptance": None, "decode_ms_per_token": None}
    d = {k: after[k] - before[k] for k in SERVER_COUNTERS}
    forwards, drafts, tokens = (d["padrec_target_forwards_total"], d["padrec_draft_tokens_total"],
                                d["padrec_decode_tokens_total"])
    return {
        "tau": tokens / forwards if forwards else None,
        "acceptance": d["padrec_accepted_tokens_total"] / drafts if drafts else None,
        "decode_ms_per_token": 1e3 * d["padrec_decode_seconds_total"] / tokens if tokens else None,
    }


def read_locust_stats(csv_path: Path) -> dict[str, float]:
    """The 'Aggregated' row of locust's ``<prefix>_stats.csv``."""
    with open(csv_path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["Name"] == "Aggregated"]
    if not rows:
        raise RuntimeError(f"no Aggregated row in {csv_path}")
    row = rows[0]

    def num(key: str) -> float:
        value = row.get(key, "")
        return float(value) if value not in ("", "N/A") else 0.0

    return {"requests": int(num("Request Count")), "failures": int(num("Failure Count")),
            "rps": num("Requests/s"), "p50_ms": num("50%"), "p95_ms": num("95%"),
            "p99_ms": num("99%"), "mean_ms": num("Average Response Time")}


def warm_up(host: str, dataset: str, data_dir: str | None, k: int, requests: int) -> None:
    """A few sequential requests before a measured run: the first ones pay one-off costs
    (lazy initialisation, allocator growth) that would otherwise land in the percentiles."""
    from padrec_vllm.data.s3rec import leave_one_out, load_dataset

    test = leave_one_out(load_dataset(dataset, data_dir).sequences).test
    for history, _target in list(test.values())[:requests]:
        req = urllib.request.Request(host + "/recommend", method="POST",
                                     data=json.dumps({"history": history, "k": k}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()


def run_locust(host: str, users: int, duration_s: float, out: Path, *, label: str, dataset: str,
               data_dir: str | None, k: int, seed: int = 0, warmup: int = 2) -> RunResult:
    """One headless locust run of ``users`` closed-loop users for ``duration_s`` against ``host``,
    after ``warmup`` unmeasured requests."""
    out.mkdir(parents=True, exist_ok=True)
    if warmup:
        warm_up(host, dataset, data_dir, k, warmup)
    prefix = out / f"{label}-u{users}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{duration_s:g}s",
           "--host", host, "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
           "--stop-timeout", "10", "--loglevel", "WARNING",
           "--dataset", dataset, "--k", str(k), "--seed", str(seed)]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    before = scrape(host)
    with open(f"{prefix}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=duration_s + 120,
                              check=False)
    stats_csv = Path(f"{prefix}_stats.csv")
    if not stats_csv.is_file():
        raise RuntimeError(f"locust exited {proc.returncode} without stats; see {prefix}.log")
    after = scrape(host)
    return RunResult(label=label, users=users, duration_s=duration_s,
                     **read_locust_stats(stats_csv), **server_figures(before, after))


def report_markdown(results: list[RunResult], title: str, command: str) -> str:
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             ("| label | users | requests | failures | req/s | p50 ms | p95 ms | p99 ms | tau "
              "| acceptance | decode ms/token |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.label} | {r.users} | {r.requests} | {r.failures} | {r.rps:.2f} | "
                     f"{r.p50_ms:.0f} | {r.p95_ms:.0f} | {r.p99_ms:.0f} | {_fmt(r.tau)} | "
                     f"{_fmt(r.acceptance, '.0%')} | {_fmt(r.decode_ms_per_token)} |")
    return "\n".join(lines) + "\n"


# --- sweep ----------------------------------------------------------------------------------

def sweep_markdown(results: list[RunResult], command: str, note: str = "") -> str:
    """One row per concurrency: both modes side by side and the speedup under load."""
    by = {(r.label, r.users): r for r in results}
    users = sorted({r.users for r in results})
    lines = ["| users | mode | req/s | p50 ms | p95 ms | p99 ms | failures | tau | acceptance |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    speed = ["| users | throughput speedup (req/s on / off) | p50 speedup (off / on) |",
             "|---:|---:|---:|"]
    for u in users:
        for label in ("spec", "plain"):
            r = by.get((label, u))
            if r is None:
                continue
            mode = "speculation on" if label == "spec" else "speculation off"
            lines.append(f"| {u} | {mode} | {r.rps:.2f} | {r.p50_ms:.0f} | {r.p95_ms:.0f} | "
                         f"{r.p99_ms:.0f} | {r.failures}/{r.requests} | {_fmt(r.tau)} | "
                         f"{_fmt(r.acceptance, '.0%')} |")
        on, off = by.get(("spec", u)), by.get(("plain", u))
        if on and off:
            rps = on.rps / off.rps if off.rps else None
            p50 = off.p50_ms / on.p50_ms if on.p50_ms else None
            speed.append(f"| {u} | {_fmt(rps)}x | {_fmt(p50)}x |")
    head = [f"Command: `{command}`", ""] + ([note, ""] if note else [])
    return "\n".join(head + lines + [""] + speed) + "\n"


def sweep(args) -> list[RunResult]:
    results: list[RunResult] = []
    common = {"dataset": args.dataset, "data_dir": args.data_dir, "k": args.k, "seed": args.seed,
              "warmup": args.warmup}
    modes = (("spec", "true", args.spec_host), ("plain", "false", args.plain_host))
    for label, flag, host in modes:
        if host:
            server = contextlib.nullcontext(host.rstrip("/"))
        else:
            env = dict(args.env)
            env.setdefault("PADREC_ENGINE", args.engine)
            if args.data_dir:
                env.setdefault("PADREC_DATA_DIR", str(args.data_dir))
            env["PADREC_SPECULATIVE"] = flag
            server = local_server(args.artifacts, args.out / f"server-{label}.log", env=env,
                                  ready_timeout_s=args.ready_timeout)
        with server as url:
            for users in args.users:
                r = run_locust(url, users, args.duration, args.out, label=label, **common)
                print(f"{label:5s} users={users:3d} req/s={r.rps:7.2f} p50={r.p50_ms:6.0f} ms "
                      f"p99={r.p99_ms:6.0f} ms failures={r.failures}/{r.requests}", flush=True)
                results.append(r)
    return results


# --- command line -------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _users(text: str) -> list[int]:
    try:
        users = [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from None
    if not users or min(users) < 1:
        raise argparse.ArgumentTypeError(f"users must be >= 1: {text!r}")
    return users


def _env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE: {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loadtests/run.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--duration", type=parse_duration, default=30.0,
                       help="each run's length: 30s, 2m, ... (default 30s)")
        p.add_argument("--dataset", default=None,
                       help="dataset of the histories "
                            "(default: build.json of --artifacts, else Beauty)")
        p.add_argument("--data-dir", default=None, help="datasets folder")
        p.add_argument("--k", type=int, default=10, help="items per recommendation")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--warmup", type=int, default=2,
                       help="unmeasured requests before each run (default 2)")
        p.add_argument("--out", type=Path, required=True, help="report folder")

    one = sub.add_parser("run", help="one headless run against a running server")
    one.add_argument("--host", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    one.add_argument("--users", type=int, default=4, help="concurrent users (default 4)")
    one.add_argument("--ready-timeout", type=float, default=300.0,
                     help="seconds to wait for /readyz before starting (default 300)")
    common(one)

    sw = sub.add_parser("sweep", help="concurrency sweep with speculation on and off")
    sw.add_argument("--users", type=_users, default=[1, 4, 16], help="default 1,4,16")
    sw.add_argument("--artifacts", type=Path, default=None,
                    help="start local servers on this artifacts directory")
    sw.add_argument("--engine", default="vllm", choices=["vllm", "reference"],
                    help="engine of the local servers (default vllm)")
    sw.add_argument("--env", type=_env, action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the local servers, e.g. PADREC_VLLM_KV_CACHE_GIB=1")
    sw.add_argument("--ready-timeout", type=float, default=900.0,
                    help="seconds to wait for /readyz")
    sw.add_argument("--spec-host", default=None, help="running server with speculation on")
    sw.add_argument("--plain-host", default=None, help="running server with speculation off")
    sw.add_argument("--note", default="", help="a line printed above the table (hardware, preset)")
    common(sw)

    so = sub.add_parser("soak", help="steady load on a local server, its memory sampled")
    so.add_argument("--artifacts", type=Path, required=True, help="artifacts of the local server")
    so.add_argument("--engine", default="vllm", choices=["vllm", "reference"],
                    help="engine of the local server (default vllm)")
    so.add_argument("--users", type=int, default=16, help="concurrent users (default 16)")
    so.add_argument("--sample", type=parse_duration, default=30.0,
                    help="RSS sampling interval: 30s, 1m, ... (default 30s)")
    so.add_argument("--env", type=_env, action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the local server")
    so.add_argument("--ready-timeout", type=float, default=900.0,
                    help="seconds to wait for /readyz")
    common(so)
    return parser


def run_soak(args, command: str) -> int:
    from loadtests.soak import soak, write_reports

    env = dict(args.env)
    env.setdefault("PADREC_ENGINE", args.engine)
    if args.data_dir:
        env.setdefault("PADREC_DATA_DIR", str(args.data_dir))
    locust_args = ["--dataset", args.dataset, "--k", str(args.k), "--seed", str(args.seed)]
    if args.data_dir:
        locust_args += ["--data-dir", str(args.data_dir)]
    with local_server_process(args.artifacts, args.out / "server.log", env=env,
                              ready_timeout_s=args.ready_timeout) as (url, proc):
        if args.warmup:
            warm_up(url, args.dataset, args.data_dir, args.k, args.warmup)
        result = soak(url, proc.pid, users=args.users, duration_s=args.duration,
                      sample_s=args.sample, out=args.out, locust_args=locust_args)
    print(write_reports(result, args.out, command))
    return 1 if result.failures or not result.requests else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "python loadtests/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    artifacts = getattr(args, "artifacts", None)
    if args.command == "sweep" and not artifacts and not (args.spec_host and args.plain_host):
        parser.error("sweep needs --artifacts, or both --spec-host and --plain-host")
    if args.dataset is None:
        from padrec_vllm.artifacts import ArtifactPaths

        paths = ArtifactPaths(artifacts) if artifacts else None
        built = paths is not None and paths.build_info.is_file()
        args.dataset = paths.read_build_info()["dataset"] if built else "Beauty"
    args.out.mkdir(parents=True, exist_ok=True)

    if args.command == "soak":
        return run_soak(args, command)
    if args.command == "run":
        wait_ready(args.host.rstrip("/"), args.ready_timeout)
        results = [run_locust(args.host.rstrip("/"), args.users, args.duration, args.out,
                              label="run", dataset=args.dataset, data_dir=args.data_dir, k=args.k,
                              seed=args.seed, warmup=args.warmup)]
        (args.out / "report.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
        (args.out / "report.md").write_text(report_markdown(results, "padrec load test", command))
        print(report_markdown(results, "padrec load test", command))
    else:
        results = sweep(args)
        (args.out / "sweep.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
        table = sweep_markdown(results, command, args.note)
        (args.out / "sweep.md").write_text(table)
        print(table)
    return 1 if any(r.failures for r in results) or not all(r.requests for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
