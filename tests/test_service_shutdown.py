"""Graceful shutdown under keep-alive load: a real `python -m service` process, 64 aiohttp clients each sending one
request after another on a pooled keep-alive connection, SIGTERM in the middle of the run. Nothing a client sent may
be lost: every request gets a status, or its connection is refused before the request is sent. A connection reset
or a server disconnect after the request went out is a request the client cannot account for."""

from __future__ import annotations

import asyncio
import collections
import socket
import time

import aiohttp
import pytest
from support import ServiceProcess, mnist_png

CLIENTS = 64


async def _client(session: aiohttp.ClientSession, url: str, body: bytes, outcomes: collections.Counter) -> None:
    """One closed-loop client: the next request as soon as the last one is answered, until it is refused."""
    while True:
        try:
            async with session.post(url, data=body, headers={"Content-Type": "image/png"}) as response:
                payload = await response.json()
                if response.status == 200:
                    outcomes[200] += 1
                else:
                    closes = response.headers.get("Connection") == "close" and "Retry-After" in response.headers
                    outcomes[f"{response.status} {payload['error']}{'' if closes else ' (keep-alive)'}"] += 1
        except aiohttp.ClientConnectorError as exc:  # before the request was sent
            outcomes["refused" if isinstance(exc.os_error, ConnectionRefusedError) else f"connect {exc!r}"] += 1
            return
        except aiohttp.ServerDisconnectedError:
            outcomes["server disconnected"] += 1
        except aiohttp.ClientOSError as exc:
            outcomes[f"reset ({exc})"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcomes[f"lost {type(exc).__name__}"] += 1


async def _run(server: ServiceProcess, started: int) -> collections.Counter:
    """The clients, SIGTERM once they have `started` answers, then until every client has been refused."""
    outcomes: collections.Counter = collections.Counter()
    body = mnist_png(7)
    connector = aiohttp.TCPConnector(limit=CLIENTS, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        clients = [
            asyncio.create_task(_client(session, server.url + "/classify", body, outcomes)) for _ in range(CLIENTS)
        ]
        deadline = time.monotonic() + 60
        while outcomes[200] < started:
            assert time.monotonic() < deadline, outcomes
            assert not any(c.done() for c in clients), outcomes
            await asyncio.sleep(0.01)
        server.terminate()
        await asyncio.wait_for(asyncio.gather(*clients), 60)
    return outcomes


@pytest.mark.parametrize("delay", ["0", "1"], ids=["no-delay", "shutdown-delay"])
def test_sigterm_under_keep_alive_load_loses_no_request(model_dir, delay):
    # In-process compute: the drain is the HTTP layer's; a compute child would only add seconds of start-up here
    # (tests/test_service_server.py drains one).
    options = ["--max-batch-size", "64", "--max-delay-ms", "20", "--no-compute-process", "--shutdown-delay-s", delay]
    server = ServiceProcess(["--model", str(model_dir), *options])
    try:
        server.wait_ready()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as idle:
            # A keep-alive connection that answered one request, then stays idle through the drain.
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: soap\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):
                answer += idle.recv(4096)
            outcomes = asyncio.run(_run(server, started=4 * CLIENTS))
            assert idle.recv(1) == b""  # closed by the server with a FIN, not reset
        code = server.proc.wait(60)
    finally:
        server.stop()
    lost = {k: v for k, v in outcomes.items() if k not in (200, "503 shutting_down", "refused")}
    assert lost == {}, outcomes
    assert outcomes["refused"] == CLIENTS, outcomes
    assert code == 0, server.output()


def test_the_listener_filter_drops_new_connections_and_keeps_established_ones():
    """refuse_new_connections: a connection attempt after it never completes (its SYNs are dropped, so the client is
    refused once the socket closes, before it sent anything); a connection accepted before it still carries data both
    ways, and so does one whose handshake completed before it (the kernel's accept queue)."""
    from service.server import refuse_new_connections

    with socket.create_server(("127.0.0.1", 0), backlog=8) as listener:
        port = listener.getsockname()[1]
        before = socket.create_connection(("127.0.0.1", port), timeout=5)
        served, _ = listener.accept()
        queued = socket.create_connection(("127.0.0.1", port), timeout=5)  # in the accept queue at the attach
        assert refuse_new_connections(listener)
        with pytest.raises(TimeoutError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5)
        late, _ = listener.accept()
        for client, server in ((before, served), (queued, late)):
            with client, server:
                client.sendall(b"request")
                assert server.recv(16) == b"request"
                server.sendall(b"answer")
                assert client.recv(16) == b"answer"
