"""Drain the write notifications of vLLM's shared-memory message queues while they are busy.

vLLM's multiprocess executor passes every engine step between the engine core and its worker
through shared-memory ring buffers (``shm_broadcast.MessageQueue``). The writer publishes a
one-byte notification per message on a ZeroMQ PUB socket; each reader subscribes with a
``ZMQ_CONFLATE`` SUB socket and only receives from it when it goes idle
(``SpinCondition.wait``). Under steady load a reader stays in its busy loop and never receives,
and libzmq then keeps every notification it was sent: a conflating socket only drops old
messages when it processes its inbound pipe, on a receive or a ``ZMQ_EVENTS`` query (libzmq's
documentation of ``ZMQ_CONFLATE``; libzmq issue 3171). Both vLLM processes grew by tens of bytes
per engine step that way, without end (docs/DEPLOY.md, "Memory under steady load").

The hook wraps ``SpinCondition.record_read`` (called after every message read) and, at most every
``DRAIN_INTERVAL_S``, receives whatever notifications are pending without blocking. Safe: a
notification is only sent after its message is in shared memory, and the reader checks shared
memory before it ever waits on the socket, so a drained notification cannot be a missed wake-up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from padrec_vllm.vllm_plugin.patching import install_hook

SPIN_CONDITION = ("vllm.distributed.device_communicators.shm_broadcast", "SpinCondition",
                  "record_read")
DRAIN_INTERVAL_S = 0.05
_LAST_DRAIN = "_padrec_last_drain"


def drain(socket) -> int:
    """Receive every pending message of ``socket`` without blocking; how many there were."""
    import zmq

    n = 0
    while True:
        try:
            socket.recv(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return n
        n += 1


def _hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def record_read(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        socket = getattr(self, "local_notify_socket", None)
        if self.is_reader and socket is not None:
            now = self.last_read
            if now - getattr(self, _LAST_DRAIN, float("-inf")) >= DRAIN_INTERVAL_S:
                setattr(self, _LAST_DRAIN, now)
                drain(socket)
        return out

    return record_read


def install() -> None:
    """Wrap ``SpinCondition.record_read`` (idempotent); PatchError when vLLM lacks it."""
    install_hook(SPIN_CONDITION, _hook, ("self",))
