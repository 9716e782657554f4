"""A real server in a subprocess on a free loopback port: started, awaited on its readiness route, stopped with
SIGTERM (the service drains: it answers what it accepted, then exits) and killed only if it does not exit.

    with ServiceProcess(["--model", "models/zoo/mnist-fcn-dr"]) as server:   # returns once /readyz answers 200
        httpx.post(server.url + "/classify", ...)
    # here the server has drained and exited

The server's output goes to a file (a temporary one, or `log_dir`/server-PORT.log to keep), never a pipe: a chatty
server must never block on it, and a server that fails to start can say why (`output()`, also after `stop()`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

from benchmarks.harness import ROOT
from benchmarks.harness.ports import free_port

# Loopback only: never through a proxy that the environment may name (http_proxy).
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerProcess:
    """`python ARGS --port N` in a subprocess, for any Python program that serves HTTP on 127.0.0.1:N.

    `env` adds to (or overrides) this process's environment; the child runs unbuffered so that its output is in
    the log when it dies. `cwd` is the source tree it runs: `python -m service` imports the package found there.
    `before_exec` runs in the child before the program starts (a resource limit, say)."""

    def __init__(
        self,
        args: list[str],
        ready_path: str = "/readyz",
        *,
        cwd: Path = ROOT,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        before_exec: Callable[[], None] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.log_path = log_dir / f"server-{self.port}.log" if log_dir else None
        self._log: IO[bytes] = (
            self.log_path.open("w+b") if self.log_path else tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        )
        self._final_output: str | None = None
        self.proc = subprocess.Popen(
            [sys.executable, *args, "--port", str(self.port)],
            cwd=cwd,
            env={**self._base_environment(), "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=before_exec,  # a resource limit and the like (see the docstring)
        )

    @staticmethod
    def _base_environment() -> dict[str, str]:
        return dict(os.environ)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, chars: int = 4000) -> str:
        """The last `chars` characters the server printed."""
        if self._final_output is not None:
            return self._final_output[-chars:]
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until the readiness route answers 200; raise (with the server's output) if the server exits or
        is not ready within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "none"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with _NO_PROXY.open(self.url + self.ready_path, timeout=1.0) as answer:
                    if answer.status == 200:
                        return
                    last = f"HTTP {answer.status}"
            except urllib.error.HTTPError as exc:  # 503 while warming up
                last = f"HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}"
            except (OSError, ValueError) as exc:  # not listening yet
                last = repr(exc)
            time.sleep(0.1)
        raise TimeoutError(f"server did not become ready in {timeout:.0f} s (last answer: {last}):\n{self.output()}")

    async def wait_ready_async(self, timeout: float = 180.0) -> None:
        """`wait_ready` from async code, without blocking the event loop."""
        await asyncio.to_thread(self.wait_ready, timeout)

    def rss_bytes(self) -> int:
        """The server process's resident memory (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def terminate(self) -> None:
        """SIGTERM without waiting: the service starts draining."""
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait up to `timeout` seconds for the drain, then kill. Idempotent; output() still works."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._final_output is None:
            self._final_output = self.output(chars=1_000_000)
            self._log.close()

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


class ServiceProcess(ServerProcess):
    """`python -m service --host 127.0.0.1 --port N ARGS`: the real service.

    Inherited SOAP_* variables are dropped: the service reads its settings from them, and a server started by a
    test or a benchmark takes its settings from its arguments and `env`, not from the shell that started it."""

    def __init__(
        self,
        args: list[str],
        env: Mapping[str, str] | None = None,
        *,
        cwd: Path = ROOT,
        log_dir: Path | None = None,
        before_exec: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            ["-m", "service", "--host", "127.0.0.1", *args], cwd=cwd, env=env, log_dir=log_dir, before_exec=before_exec
        )

    @staticmethod
    def _base_environment() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("SOAP_")}


def service_options(**options: object) -> list[str]:
    """Keyword options as the service's flags: max_queue=32 -> --max-queue 32; True -> the bare flag; None -> left
    out."""
    args: list[str] = []
    for key, value in options.items():
        if value is True:
            args.append("--" + key.replace("_", "-"))
        elif value is not None:
            args += ["--" + key.replace("_", "-"), str(value)]
    return args


def service_server(model: str, cwd: Path = ROOT, **options: object) -> ServiceProcess:
    """The service on `model` with `options` (see service_options), from the source tree `cwd`."""
    return ServiceProcess(["--model", model, *service_options(**options)], cwd=cwd)
