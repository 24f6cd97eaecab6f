"""Memory soak: steady load on a local server for a bounded time, the resident memory of the
server and every process it started (vLLM's engine core) sampled throughout.

    python loadtests/run.py soak --artifacts artifacts/demo-Beauty --users 16 --duration 1h \
        --sample 30s --out runs/soak

The verdict is the least-squares slope of the tree's memory over the last half of the run, in MB
per minute (the first half holds the warm-up growth of allocators and caches). The tree's memory is
the sum over its processes of anonymous and shared-memory RSS (``RssAnon + RssShmem``): the heap
and mmap memory a leak grows. File-backed pages (libraries, model files) are left out: they are
shared, reclaimable, and their PSS moves whenever another process on the machine maps the same
libraries. Each process gets its own slopes too (that memory, and its PSS and RSS for reference),
so growth names its process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MB = 1 << 20


@dataclass(frozen=True)
class Sample:
    t_s: float  # seconds since the load started
    rss_mb: dict[str, float]  # process label -> resident set size
    requests: float  # the server's padrec_recommendations_total
    pss_mb: dict[str, float] = field(default_factory=dict)  # label -> proportional set size
    anon_mb: dict[str, float] = field(default_factory=dict)  # label -> RssAnon
    shmem_mb: dict[str, float] = field(default_factory=dict)  # label -> RssShmem

    def private_mb(self, label: str) -> float:
        """Anonymous + shared-memory RSS of one process (its RSS where those were not read)."""
        if label in self.anon_mb:
            return self.anon_mb[label] + self.shmem_mb.get(label, 0.0)
        return self.rss_mb[label]

    @property
    def total_mb(self) -> float:
        """The tree's memory: summed ``private_mb`` of its processes."""
        return sum(self.private_mb(label) for label in self.rss_mb)


@dataclass
class SoakResult:
    users: int
    duration_s: float
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p99_ms: float
    slope_mb_per_min: float  # summed anonymous + shared-memory RSS, last half of the run
    slope_by_process: dict[str, float] = field(default_factory=dict)  # the same, by process
    pss_slope_by_process: dict[str, float] = field(default_factory=dict)
    rss_slope_by_process: dict[str, float] = field(default_factory=dict)
    start_mb: float = 0.0
    end_mb: float = 0.0
    samples: list[dict] = field(default_factory=list)


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, float]:
    """Fields of ``/proc/PID/status`` (kB) in MB; missing fields are absent."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) / 1024
    return out


def _pss_mb(pid: int) -> float:
    """PSS in MB from ``/proc/PID/smaps_rollup``."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no Pss in /proc/{pid}/smaps_rollup")


def process_tree_memory(pid: int) -> dict[str, dict[str, float]]:
    """Memory of ``pid`` and its live descendants: ``{"rss" | "pss" | "anon" | "shmem": {label:
    MB}}``, labelled ``server`` (``pid`` itself) and by process name for the others (``name#2``
    when a name repeats)."""
    import psutil

    root = psutil.Process(pid)
    out: dict[str, dict[str, float]] = {"rss": {}, "pss": {}, "anon": {}, "shmem": {}}
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = "server" if proc.pid == pid else proc.name()
            status = _status_kb(proc.pid, ("VmRSS", "RssAnon", "RssShmem"))
            pss = _pss_mb(proc.pid)
        except (psutil.Error, OSError):  # gone between the listing and the read
            continue
        label, n = name, 1
        while label in out["rss"]:
            n += 1
            label = f"{name}#{n}"
        out["rss"][label] = status.get("VmRSS", 0.0)
        out["pss"][label] = pss
        out["anon"][label] = status.get("RssAnon", 0.0)
        out["shmem"][label] = status.get("RssShmem", 0.0)
    return out


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(t_s, value)`` points, per minute; 0.0 for fewer than 2."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mt) * (v - mv) for t, v in points) / var


def last_half(samples: list[Sample]) -> list[Sample]:
    """The samples taken in the second half of the run."""
    if not samples:
        return []
    half = samples[-1].t_s / 2
    return [s for s in samples if s.t_s >= half]


def soak(url: str, pid: int, *, users: int, duration_s: float, sample_s: float, out: Path,
         locust_args: list[str], progress=print) -> SoakResult:
    """Run locust (``locust_args`` after the common options) against ``url`` for ``duration_s``
    and sample the RSS of ``pid``'s process tree every ``sample_s`` seconds."""
    from loadtests.run import LOCUSTFILE, read_locust_stats, scrape

    out.mkdir(parents=True, exist_ok=True)
    prefix = out / f"soak-u{users}"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{duration_s:g}s",
           "--host", url, "--csv", str(prefix), "--only-summary", "--stop-timeout", "10",
           "--loglevel", "WARNING", *locust_args]
    samples: list[Sample] = []

    def take(t0: float) -> Sample:
        counters = scrape(url) or {}
        mem = process_tree_memory(pid)
        s = Sample(time.monotonic() - t0, mem["rss"],
                   counters.get("padrec_recommendations_total", 0.0), pss_mb=mem["pss"],
                   anon_mb=mem["anon"], shmem_mb=mem["shmem"])
        samples.append(s)
        return s

    with open(f"{prefix}.log", "w") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        take(t0)
        next_at = sample_s
        while proc.poll() is None:
            time.sleep(max(0.0, min(next_at - (time.monotonic() - t0), 1.0)))
            if time.monotonic() - t0 >= next_at and proc.poll() is None:
                s = take(t0)
                progress(f"  {s.t_s / 60:6.1f} min  anon+shmem {s.total_mb:8.1f} MB  "
                         f"requests {s.requests:9.0f}")
                next_at += sample_s
        take(t0)
    stats_csv = Path(f"{prefix}_stats.csv")
    if not stats_csv.is_file():
        raise RuntimeError(f"locust exited {proc.returncode} without stats; see {prefix}.log")
    stats = read_locust_stats(stats_csv)
    tail = last_half(samples)
    labels = sorted({label for s in samples for label in s.rss_mb})
    return SoakResult(
        users=users,
        duration_s=duration_s,
        requests=stats["requests"],
        failures=stats["failures"],
        rps=stats["rps"],
        p50_ms=stats["p50_ms"],
        p99_ms=stats["p99_ms"],
        slope_mb_per_min=slope_per_min([(s.t_s, s.total_mb) for s in tail]),
        slope_by_process={label: slope_per_min([(s.t_s, s.private_mb(label)) for s in tail
                                                 if label in s.rss_mb]) for label in labels},
        pss_slope_by_process=_slopes(tail, labels, "pss_mb"),
        rss_slope_by_process=_slopes(tail, labels, "rss_mb"),
        start_mb=samples[0].total_mb,
        end_mb=samples[-1].total_mb,
        samples=[{**asdict(s), "total_mb": s.total_mb} for s in samples],
    )


def _slopes(samples: list[Sample], labels: list[str], kind: str) -> dict[str, float]:
    """Per-process slope (MB/min) of the ``kind`` field (``pss_mb``, ``anon_mb``, ...)."""
    return {label: slope_per_min([(s.t_s, getattr(s, kind)[label]) for s in samples
                                  if label in getattr(s, kind)])
            for label in labels}


def soak_markdown(r: SoakResult, command: str) -> str:
    per_request = r.slope_mb_per_min * 1024 / (60 * r.rps) if r.rps else 0.0
    lines = [f"Command: `{command}`", "",
             "| users | minutes | requests | failures | req/s | p50 ms | p99 ms | start MB "
             "| end MB | slope, last half (MB/min) | KB per request, last half |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {r.users} | {r.duration_s / 60:.0f} | {r.requests} | {r.failures} | {r.rps:.1f} | "
             f"{r.p50_ms:.0f} | {r.p99_ms:.0f} | {r.start_mb:.0f} | {r.end_mb:.0f} | "
             f"{r.slope_mb_per_min:+.3f} | {per_request:+.3f} |", "",
             "Memory is anonymous + shared-memory RSS summed over the processes. Slope by process "
             "(last half, MB/min), that memory / PSS / RSS: "
             + ", ".join(f"{k} {v:+.3f} / {r.pss_slope_by_process.get(k, 0.0):+.3f} / "
                         f"{r.rss_slope_by_process.get(k, 0.0):+.3f}"
                         for k, v in r.slope_by_process.items())]
    return "\n".join(lines) + "\n"


def plot(r: SoakResult, path: Path) -> None:
    """Anonymous + shared-memory RSS of each process and the tree's sum against minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    t = [s["t_s"] / 60 for s in r.samples]
    labels = sorted({k for s in r.samples for k in s["rss_mb"]})
    for label in labels:
        ax.plot(t, [s["anon_mb"].get(label, float("nan")) + s["shmem_mb"].get(label, 0.0)
                    for s in r.samples], label=label)
    ax.plot(t, [s["total_mb"] for s in r.samples], "k-", label="sum")
    ax.set_xlabel("minutes under load")
    ax.set_ylabel("anonymous + shmem RSS (MB)")
    ax.set_title(f"soak: {r.users} users, last-half slope {r.slope_mb_per_min:+.3f} MB/min")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(r: SoakResult, out: Path, command: str) -> str:
    (out / "soak.json").write_text(json.dumps(asdict(r), indent=2))
    table = soak_markdown(r, command)
    (out / "soak.md").write_text(table)
    plot(r, out / "soak.png")
    return table
