"""The soak's memory readings (loadtests/soak.py): shared memory is read as such (and PSS splits
it between the processes that map it), and the tree's memory is anonymous + shared-memory RSS."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os

from loadtests.soak import Sample, last_half, process_tree_memory, slope_per_min

MB = 1 << 20


def _hold(conn) -> None:
    conn.recv()  # keep the inherited shared mapping alive until told to exit


def test_shared_memory_counts_once_in_the_tree():
    shared = mmap.mmap(-1, 64 * MB, flags=mmap.MAP_SHARED)
    shared.write(b"\1" * (64 * MB))  # touch every page in the parent
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_hold, args=(child,))
    proc.start()
    try:
        for page in range(0, 64 * MB, mmap.PAGESIZE):  # and in the child, through its mapping
            shared[page]
        mem = process_tree_memory(os.getpid())
    finally:
        parent.send("exit")
        proc.join(timeout=30)
    assert set(mem) == {"rss", "pss", "anon", "shmem"} and len(mem["rss"]) >= 1
    assert mem["shmem"]["server"] >= 60
    # the parent's PSS holds only part of the 64 MB it shares with its child
    assert mem["pss"]["server"] < mem["rss"]["server"] - 16


def test_total_is_anonymous_and_shared_memory_and_slopes_are_per_minute():
    s = Sample(0.0, {"a": 100.0, "b": 100.0}, 0.0, pss_mb={"a": 60.0, "b": 60.0},
               anon_mb={"a": 40.0, "b": 30.0}, shmem_mb={"a": 5.0, "b": 0.0})
    assert s.private_mb("a") == 45.0 and s.total_mb == 75.0
    assert Sample(0.0, {"a": 100.0}, 0.0).total_mb == 100.0  # RSS where nothing else was read
    assert abs(slope_per_min([(0.0, 10.0), (60.0, 11.0), (120.0, 12.0)]) - 1.0) < 1e-9
    samples = [Sample(t, {}, 0.0) for t in (0.0, 30.0, 60.0, 90.0)]
    assert [s.t_s for s in last_half(samples)] == [60.0, 90.0]
