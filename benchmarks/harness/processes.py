"""The service's compute processes, found from /proc (Linux) by the server's pid: what a chaos benchmark kills and
a test watches. On the CPU they are children of multiprocessing's fork server (itself a child of the server,
service/compute_process.py); spawned ones (on a GPU) are children of the server. The fork server and the resource
tracker are not compute processes."""

from __future__ import annotations

import contextlib
from pathlib import Path


def children(pid: int) -> list[int]:
    """The direct child processes of `pid` (a child belongs to the thread that started it: every thread's list)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # exited meanwhile
        return b""


def compute_processes(server_pid: int) -> list[int]:
    """The pids of the server's compute processes."""
    found: list[int] = []
    for child in children(server_pid):
        cmdline = _cmdline(child)
        if b"spawn_main" in cmdline:  # a spawned compute process
            found.append(child)
        elif b"forkserver" in cmdline:  # the fork server: its children are the compute processes
            found += children(child)
    return found
