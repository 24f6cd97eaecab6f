"""What vLLM's processes say at start-up: the root cause of a failed start, and two known noises.

``install()`` runs in every vLLM process (``register``, the plugin entry point, which vLLM calls
in the engine core and worker processes too). It adds three things, each narrow:

**Root cause of a failed start.** vLLM's engine core runs in a child process. When it cannot
start it logs the exception there (``EngineCore failed to start.``, with the traceback) and
exits, and the caller gets only ``RuntimeError: Engine core initialization failed. See root cause
above.``: the cause is not in the exception chain. ``watched_start()`` (around an engine build, in
the caller) makes a fresh file and names it in ``PADREC_VLLM_ERROR_FILE``, which the child
processes inherit; in each vLLM process a handler on the ``vllm`` logger appends to that file,
while it exists, the innermost exception (``__cause__`` / ``__context__`` chain) of every ERROR
record that carries one, as one line ``Type: first line of the message``. The caller reads the
first line: the earliest root cause any process logged. Nothing else is changed: the records
are still printed as before.

**Quiet start (vLLM's CPU build).** vLLM's CPU linears keep a oneDNN matmul handle in a
``CPUDNNLGEMMHandler`` (``vllm._custom_ops``), whose ``__del__`` releases it with
``self.dtor(self.handler_tensor.item())``. When the garbage collector happens to collect a
handler while torch.compile's warm-up has a FakeTensorMode active, that ``.item()`` on a real
tensor is refused (``AssertionError: Please convert all Tensors to FakeTensors first ...``),
Python prints ``Exception ignored in: <function CPUDNNLGEMMHandler.__del__ ...>`` and a 30-line
traceback, and the handle is never released. ``sys.unraisablehook`` is wrapped to finish that
one job: for an event whose object is ``CPUDNNLGEMMHandler.__del__`` of ``vllm._custom_ops`` and
whose exception is an ``AssertionError`` raised in torch's fake-tensor code
(``torch/_subclasses/``), it takes the handler from the ``__del__`` frame and releases the handle
with the fake mode unset (``unset_fake_temporarily``); only when that succeeds is the event
dropped. Every other unraisable exception, that ``__del__`` failing any other way, or a release
that fails again, goes to the previous hook unchanged.

**The allocator warning.** vLLM's CPU worker warns ``libtcmalloc is not found in LD_PRELOAD`` at
every start when another allocator is preloaded. The project preloads jemalloc by default
(``padrec_vllm.cpu_runtime``), so a filter on that worker's logger drops exactly that record
while ``LD_PRELOAD`` holds ``libjemalloc``; without any allocator preloaded the warning stays.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

ERROR_FILE_ENV = "PADREC_VLLM_ERROR_FILE"
NOISY_DEL = ("vllm._custom_ops", "CPUDNNLGEMMHandler.__del__")
FAKE_TENSOR_CODE = f"torch{os.sep}_subclasses{os.sep}"
CPU_WORKER_LOGGER = "vllm.v1.worker.cpu_worker"
MISSING_PRELOAD = "%s is not found in LD_PRELOAD"

def install() -> None:
    """The root-cause handler on the ``vllm`` logger and the unraisable-hook filter, each added
    when missing (idempotent, and again after something reset the logger or the hook; module
    docstring)."""
    logger = logging.getLogger("vllm")
    if not any(isinstance(h, RootCauseHandler) for h in logger.handlers):
        logger.addHandler(RootCauseHandler())
    if getattr(sys.unraisablehook, "padrec_wrapped", None) is None:
        sys.unraisablehook = quiet_unraisable(sys.unraisablehook)
    worker_logger = logging.getLogger(CPU_WORKER_LOGGER)
    if not any(isinstance(f, AllocatorWarningFilter) for f in worker_logger.filters):
        worker_logger.addFilter(AllocatorWarningFilter())


class AllocatorWarningFilter(logging.Filter):
    """Drops vLLM's ``libtcmalloc is not found in LD_PRELOAD`` while jemalloc is preloaded
    (module docstring); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(MISSING_PRELOAD)
                    and record.args == ("libtcmalloc",)
                    and "libjemalloc" in os.environ.get("LD_PRELOAD", ""))


# --------------------------------------------------------------------------- root cause


def root_cause(exc: BaseException) -> str:
    """The innermost exception of ``exc``'s chain as one line: ``Type: first message line``."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if inner is None:
            break
        exc = inner
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class RootCauseHandler(logging.Handler):
    """Appends ``root_cause`` of each ERROR record with an exception to the file named by
    ``PADREC_VLLM_ERROR_FILE``, only while that file exists (it is never created here)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        path = os.environ.get(ERROR_FILE_ENV)
        exc = record.exc_info[1] if record.exc_info else None
        if not path or exc is None:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError:
            return
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(root_cause(exc) + "\n")


@contextlib.contextmanager
def watched_start() -> Iterator[Callable[[], str | None]]:
    """Around an engine build: yields ``cause()``, the first root cause a vLLM process logged
    since the block began, or None (module docstring)."""
    fd, path = tempfile.mkstemp(prefix="padrec-vllm-start-", suffix=".txt")
    os.close(fd)
    before = os.environ.get(ERROR_FILE_ENV)
    os.environ[ERROR_FILE_ENV] = path

    def cause() -> str | None:
        with open(path, encoding="utf-8") as f:
            return f.readline().strip() or None

    try:
        yield cause
    finally:
        if before is None:
            os.environ.pop(ERROR_FILE_ENV, None)
        else:
            os.environ[ERROR_FILE_ENV] = before
        os.unlink(path)


# --------------------------------------------------------------------------- quiet start


def is_handler_del_under_fake_mode(args) -> bool:
    """``args`` (``sys.UnraisableHookArgs``) is ``CPUDNNLGEMMHandler.__del__`` refused by an
    active FakeTensorMode (module docstring)."""
    obj = args.object
    if (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)) != NOISY_DEL:
        return False
    if not isinstance(args.exc_value, AssertionError):
        return False
    tb = args.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and FAKE_TENSOR_CODE in tb.tb_frame.f_code.co_filename


def release_outside_fake_mode(args) -> bool:
    """Do what the refused ``__del__`` meant to: release its handler's oneDNN handle, with the
    fake mode unset. True when it was released."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        handler = args.exc_traceback.tb_frame.f_locals["self"]  # the __del__ frame
        with unset_fake_temporarily():
            handler.dtor(handler.handler_tensor.item())
        handler.handler_tensor = None
    except Exception:  # noqa: BLE001 - any failure: the event goes to the previous hook
        return False
    return True


def quiet_unraisable(hook: Callable) -> Callable:
    """``hook`` behind a filter that handles ``is_handler_del_under_fake_mode`` events itself
    (``release_outside_fake_mode``) and passes every other event on."""

    def filtered(args) -> None:
        if is_handler_del_under_fake_mode(args) and release_outside_fake_mode(args):
            return
        hook(args)

    filtered.padrec_wrapped = hook
    return filtered
