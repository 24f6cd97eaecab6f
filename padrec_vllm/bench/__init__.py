"""``padrec bench``: plain and speculative decoding side by side, in one process.

``run_reference_bench`` (here) and ``padrec_vllm.vllm_plugin.bench.run_vllm_bench`` (vLLM) give
the same JSON (``bench.report``); the CLI picks one by ``--engine``.
"""

from padrec_vllm.bench.methods import MethodSpec, parse_method
from padrec_vllm.bench.reference import run_reference_bench, time_head_forwards
from padrec_vllm.bench.report import bench_result, format_table, plot_acceptance, write_outputs
from padrec_vllm.bench.setup import BenchConfig, BenchSetup, MethodRun, bench_setup, bench_users

__all__ = [
    "BenchConfig",
    "BenchSetup",
    "MethodRun",
    "MethodSpec",
    "bench_result",
    "bench_setup",
    "bench_users",
    "format_table",
    "parse_method",
    "plot_acceptance",
    "run_reference_bench",
    "time_head_forwards",
    "write_outputs",
]
