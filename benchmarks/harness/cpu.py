"""CPU accounting from /proc (Linux): the CPU time of a process, of one of its threads, of a process and its child
processes (the service's compute processes), and of the whole machine. Benchmarks report it beside throughput, so
that a number measured on a shared machine can be read against what the server itself used."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int, tid: int | None = None) -> int:
    """utime + stime of a process (or one of its threads) in clock ticks."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def tree_ticks(pid: int) -> int:
    """CPU ticks of a process and its child processes, recursively."""
    total = cpu_ticks(pid)
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):  # a child belongs to the thread that started it
        with contextlib.suppress(OSError):
            children += (task / "children").read_text().split()
    for child in children:
        with contextlib.suppress(OSError):  # exited meanwhile
            total += tree_ticks(int(child))
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its child processes."""
    return tree_ticks(pid) / CLOCK_TICKS_PER_S


def machine_busy_ticks() -> int:
    """Non-idle CPU ticks of the whole machine (all processes, everyone's), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait
