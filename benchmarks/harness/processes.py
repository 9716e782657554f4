"""The service's compute processes, found from /proc (Linux) by the server's pid: what a chaos benchmark kills and
a test watches. On the CPU they are children of multiprocessing's fork server (itself a child of the server,
service/compute_process.py); spawned ones (on a GPU) are children of the server. The fork server and the resource
tracker are not compute processes."""

from __future__ import annotations

from service.process_metrics import child_pids, cmdline


def compute_processes(server_pid: int) -> list[int]:
    """The pids of the server's compute processes."""
    found: list[int] = []
    for child in child_pids(server_pid):
        command = cmdline(child)
        if b"spawn_main" in command:  # a spawned compute process
            found.append(child)
        elif b"forkserver" in command:  # the fork server: its children are the compute processes
            found += child_pids(child)
    return found
