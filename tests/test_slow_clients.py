"""Slow clients cannot take the service down (service/connection_guard.py), against the real `python -m service`:
a flood of connections that each send half a request head, under the common open-file limit of 1,024, leaves normal
requests answered within a second and is closed within the head timeout; an idle keep-alive connection is closed
after --keep-alive-timeout-s; at --max-connections the connection waiting longest for a head makes room, and when
every connection carries a request a new one gets a fast 503."""

from __future__ import annotations

import json
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support import ServiceProcess, mnist_png

SLOW_CONNECTIONS = 1100
OPEN_FILE_LIMIT = 1024
SLOW_HEAD = b"POST /classify HTTP/1.1\r\nHost: soap\r\nContent-Type: image/png\r\n"  # no blank line: never complete


class LimitedServer(ServiceProcess):
    """`python -m service` on a free loopback port (benchmarks.harness), its open-file limit (soft and hard) set before
    it starts."""

    def __init__(self, model_dir: Path, *args: str, open_files: int | None = None) -> None:
        def limit() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        super().__init__(["--model", str(model_dir), *args], before_exec=limit)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the service's own "ready:" line is logged; /readyz must then answer 200 at once."""
        deadline = time.monotonic() + timeout
        while "ready: http://" not in self.output(chars=1_000_000):
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "no ready line: " + self.output()[-3000:]
            time.sleep(0.1)
        assert httpx.get(self.url + "/readyz", timeout=5).status_code == 200


@pytest.fixture
def server(model_dir: Path) -> Iterator[Callable[..., LimitedServer]]:
    started: list[LimitedServer] = []

    def start(*args: str, open_files: int | None = None) -> LimitedServer:
        srv = LimitedServer(model_dir, *args, open_files=open_files)
        started.append(srv)
        srv.wait_ready()
        return srv

    yield start
    for srv in started:
        srv.stop()


def _connect(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(payload)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """The server closed this connection: EOF (after any answer it wrote) or a reset."""
    sock.setblocking(False)
    try:
        while chunk := sock.recv(65536):
            del chunk
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _classify(url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = httpx.post(url + "/classify", content=mnist_png(7), headers={"Content-Type": "image/png"}, timeout=30)
    return answer, time.monotonic() - started


@pytest.fixture
def many_sockets() -> Iterator[None]:
    """This test process holds 1,100 client sockets: raise its own soft limit for them (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = SLOW_CONNECTIONS + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"this process may open {hard} files; the test holds {SLOW_CONNECTIONS} sockets")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("many_sockets")
def test_slow_head_flood_under_1024_open_files_leaves_normal_requests_answered(server):
    head_timeout_s = 3.0
    srv = server("--head-timeout-s", str(head_timeout_s), open_files=OPEN_FILE_LIMIT)
    # A warm request first: the timing below measures the service under the flood, not its first batch.
    assert _classify(srv.url)[0].status_code == 200

    slow: list[tuple[socket.socket, float]] = []
    try:
        for _ in range(SLOW_CONNECTIONS):
            slow.append((_connect(srv.port, SLOW_HEAD), time.monotonic()))
        answer, took = _classify(srv.url)
        assert answer.status_code == 200, answer.text
        assert answer.json()["results"][0]["label"] == 7
        assert took < 1.0, f"a normal request under {SLOW_CONNECTIONS} slow connections took {took:.2f} s"

        # Every slow connection is closed by the server within the head timeout of its connect (+ scheduling slack).
        time.sleep(max(0.0, slow[-1][1] + head_timeout_s + 1.5 - time.monotonic()))
        still_open = [opened for sock, opened in slow if not _closed_by_server(sock)]
        assert not still_open, f"{len(still_open)} of {SLOW_CONNECTIONS} slow connections still open"
    finally:
        for sock, _ in slow:
            sock.close()
    assert httpx.get(srv.url + "/readyz", timeout=5).status_code == 200
    assert srv.proc.poll() is None


def test_partial_head_gets_408_and_idle_keep_alive_is_closed(server):
    srv = server("--head-timeout-s", "1", "--keep-alive-timeout-s", "1")
    with _connect(srv.port, b"GET /healthz HTTP/1.1\r\nHost: soap\r\n") as sock:
        sock.settimeout(5)
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert time.monotonic() - started < 3
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"] == "head_timeout"

    with _connect(srv.port, b"GET /healthz HTTP/1.1\r\nHost: soap\r\n\r\n") as sock:
        sock.settimeout(5)
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):  # the answer, then the close of the idle connection
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b"connection: close" not in answer.lower()  # kept alive, then closed for idling
        assert 0.8 < time.monotonic() - started < 3


def test_at_the_connection_cap_slow_heads_make_room_and_busy_connections_refuse_fast(server):
    srv = server("--max-connections", "3", "--head-timeout-s", "60")
    slow = []
    for _ in range(3):
        slow.append(_connect(srv.port, SLOW_HEAD))
        time.sleep(0.1)  # in order: the first is the one waiting longest
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200  # made room by closing the oldest slow connection
        time.sleep(0.3)
        assert [_closed_by_server(sock) for sock in slow] == [True, False, False]
        assert "the cap (--max-connections): closing the connection that has waited longest" in srv.output()
    finally:
        for sock in slow:
            sock.close()
    time.sleep(0.3)

    # Three requests in progress (their bodies never come): no connection waits for a head, so a fourth is refused.
    busy_head = b"POST /classify HTTP/1.1\r\nHost: soap\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    busy = [_connect(srv.port, busy_head) for _ in range(3)]
    try:
        time.sleep(0.5)
        started = time.monotonic()
        with _connect(srv.port, b"GET /healthz HTTP/1.1\r\nHost: soap\r\n\r\n") as sock:
            sock.settimeout(5)
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 1.0
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "too_many_connections"
    finally:
        for sock in busy:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(srv.url + "/readyz", timeout=5).status_code == 200
