"""Resident memory, CPU time and open files of the server and of every compute child, read from /proc at scrape
time.

prometheus_client's own ProcessCollector only sees the process that serves /metrics; the children that hold the
models (hundreds of MB each) would stay invisible. Reading /proc/<pid> in the parent at scrape time needs nothing
from the children (no pipe traffic, no clock in them) and costs a few file reads per process per scrape.
On systems without /proc (macOS) the collector exports nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
LABELS = ("role", "model", "worker")


@dataclass(frozen=True)
class ProcessTarget:
    """A process to report: the server itself (role "server", model and worker empty) or a compute child."""

    pid: int
    role: str
    model: str = ""
    worker: str = ""

    def labels(self) -> list[str]:
        return [self.role, self.model, self.worker]


@dataclass(frozen=True)
class ProcessStats:
    resident_bytes: int
    cpu_seconds: float
    open_fds: int


def read_process_stats(pid: int, proc: Path = PROC) -> ProcessStats | None:
    """The process's stats, or None when it is gone (or /proc is unreadable): a child may exit between the
    parent's look-up of its pid and this read."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
        fds = len(os.listdir(proc / str(pid) / "fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime, rss_pages = int(fields[11]), int(fields[12]), int(fields[21])  # stat fields 14, 15, 24
    return ProcessStats(rss_pages * _PAGE, (utime + stime) / _TICKS, fds)


def child_pids(pid: int, proc: Path = PROC) -> list[int]:
    """The direct child processes of `pid` (a child belongs to the thread that started it: every thread's list)."""
    found: list[int] = []
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def cmdline(pid: int, proc: Path = PROC) -> bytes:
    """The process's command line (NUL-separated), or b"" when it is gone."""
    try:
        return (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def fork_server_pid(parent: int | None = None, proc: Path = PROC) -> int | None:
    """The pid of the multiprocessing fork server of `parent` (default: this process), the parent of the compute
    children on the CPU (service/compute_process.py; it holds torch in memory too), or None when there is none."""
    for kid in child_pids(os.getpid() if parent is None else parent, proc):
        if b"forkserver" in cmdline(kid, proc):
            return kid
    return None


class ProcessCollector(Collector):
    """Exports soap_process_* for every process `targets()` names at scrape time."""

    def __init__(self, targets: Callable[[], Iterable[ProcessTarget]], proc: Path = PROC) -> None:
        self._targets = targets
        self._proc = proc

    def describe(self) -> list[Metric]:
        return []  # collected lazily: the children come and go

    def collect(self) -> Iterator[Metric]:
        rss = GaugeMetricFamily(
            "soap_process_resident_memory_bytes",
            "Resident memory of the server and its compute children.",
            labels=LABELS,
        )
        cpu = CounterMetricFamily(
            "soap_process_cpu_seconds",
            "User plus system CPU time of the server and its compute children.",
            labels=LABELS,
        )
        fds = GaugeMetricFamily(
            "soap_process_open_fds", "Open file descriptors of the server and its compute children.", labels=LABELS
        )
        for target in self._targets():
            stats = read_process_stats(target.pid, self._proc)
            if stats is None:
                continue
            labels = target.labels()
            rss.add_metric(labels, stats.resident_bytes)
            cpu.add_metric(labels, stats.cpu_seconds)
            fds.add_metric(labels, stats.open_fds)
        yield from (rss, cpu, fds)
