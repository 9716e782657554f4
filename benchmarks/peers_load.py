"""Requests and answer checks for benchmarks/peers.py: the two protocols' request bytes (sent alike to the service
and to its peer), and a closed-loop load that keeps every answer's label and checks it against the image's known
label. The harness's generator (benchmarks.harness.load.closed_loop) reads and drops the answers; a peer comparison
must show that each server answered correctly, so this one keeps them (checked after the level, off the clock).
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hashlib
import json
import struct
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness.cpu import CLOCK_TICKS_PER_S, machine_busy_ticks, tree_ticks
from benchmarks.harness.load import LevelResult, RawHttpClient, percentile_ms, without_gc_pauses


class Protocol(enum.Enum):
    """How an image is sent: one image per request, the same bytes to the service and to the protocol's peer."""

    JSON = "json"  # POST /classify, {"images": ["<base64>"]}: the service's JSON body; LitServe's peer
    V2_BINARY = "v2-binary"  # POST /v2/models/{name}/infer, BYTES [1, 1] in the binary tensor data extension; PyTriton

    def path(self, model: str) -> str:
        return "/classify" if self is Protocol.JSON else f"/v2/models/{model}/infer"


@dataclass(frozen=True)
class LabelledImage:
    data: bytes  # the encoded file
    label: int  # its class index in the model's class_names (the folder it is in)


def labelled_images(folder: Path, suffix: str, class_names: list[str]) -> list[LabelledImage]:
    """Every `folder/<class name>/*.<suffix>`, in a fixed order, with its label."""
    files = sorted(folder.glob(f"*/*.{suffix}"))
    if not files:
        raise SystemExit(f"no {suffix} images under {folder}/<class>/")
    return [LabelledImage(f.read_bytes(), class_names.index(f.parent.name)) for f in files]


def request_bytes(protocol: Protocol, host: str, model: str, image: bytes) -> bytes:
    """One whole HTTP/1.1 request (head and body) carrying `image`."""
    if protocol is Protocol.JSON:
        body = json.dumps({"images": [base64.b64encode(image).decode()]}).encode()
        return RawHttpClient.request(host, protocol.path(model), body, "application/json")
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "images",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(image)},
                }
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    body = header + struct.pack("<I", len(image)) + image
    head = (
        f"POST {protocol.path(model)} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def answered_label(protocol: Protocol, head: bytes, body: bytes) -> int:
    """The label in a 200 answer: `results[0].label` of a JSON answer; the `label` output of a v2 answer (binary,
    or JSON data)."""
    if protocol is Protocol.JSON:
        return int(json.loads(body)["results"][0]["label"])
    lower = head.lower()
    at = lower.find(b"\r\ninference-header-content-length:")
    length = int(lower[at + 34 : lower.index(b"\r\n", at + 2)]) if at >= 0 else len(body)
    answer = json.loads(body[:length])
    offset = length
    for output in answer["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if output["name"] == "label":
            if size is None:
                return int(output["data"][0])
            return int(struct.unpack_from("<q", body, offset)[0])
        offset += size or 0
    raise ValueError(f"no label output in {answer}")


def requests_digest(requests: list[bytes], host: str) -> str:
    """SHA-256 of the requests as sent, but for the Host header (each server listens on a port of its own): equal
    for the service and its peer."""
    host_line = f"\r\nHost: {host}\r\n".encode()
    return hashlib.sha256(b"".join(r.replace(host_line, b"\r\n", 1) for r in requests)).hexdigest()


class AnswerKeepingClient(RawHttpClient):
    """RawHttpClient that returns the answer's head and body instead of dropping them."""

    async def exchange(self, request: bytes) -> tuple[int, bytes, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                raise ValueError(f"answer without Content-Length: {head[:200]!r}")
            body = await self.reader.readexactly(int(lower[at + 17 : lower.index(b"\r\n", at + 2)]))
            if b"\r\nconnection: close" in lower:
                self.close()
            return int(head[9:12]), head, body
        except BaseException:
            self.close()
            raise


@dataclass
class Checked:
    """The answers of one level, checked: how many were 200, correct, and the label served for each image."""

    answers: int = 0
    ok: int = 0
    correct: int = 0
    unreadable: int = 0  # a 200 whose label could not be read
    inconsistent_images: int = 0  # images answered with different labels at different times
    labels: dict[int, int] = field(default_factory=dict)  # image index -> the label served

    @property
    def answer_accuracy(self) -> float | None:
        """Correct answers / 200 answers (weights each image by how often it was sent)."""
        return round(self.correct / self.ok, 4) if self.ok else None


def check_answers(
    protocol: Protocol, answers: list[tuple[int, int, bytes, bytes]], images: list[LabelledImage]
) -> Checked:
    """Check (image index, status, head, body) answers against the images' labels."""
    checked = Checked(answers=len(answers))
    for index, status, head, body in answers:
        if status != 200:
            continue
        checked.ok += 1
        try:
            label = answered_label(protocol, head, body)
        except (ValueError, KeyError, IndexError, struct.error):
            checked.unreadable += 1
            continue
        checked.correct += label == images[index].label
        if checked.labels.setdefault(index, label) != label:
            checked.inconsistent_images += 1
    return checked


@without_gc_pauses
async def checked_closed_loop(
    url: str,
    protocol: Protocol,
    model: str,
    images: list[LabelledImage],
    concurrency: int,
    duration: float,
    max_requests: int,
    warmup: float,
    name: str,
    server_pid: int,
) -> tuple[LevelResult, Checked]:
    """`concurrency` keep-alive clients, each sending its next request when its previous one is answered (client k
    sends images k, k + concurrency, ...); every answer, of the warm-up too, is kept and checked afterwards. CPU per
    level from /proc: the server's process tree, this generator, and everyone else."""
    host = urllib.parse.urlsplit(url).netloc
    requests = [request_bytes(protocol, host, model, image.data) for image in images]
    latencies: list[float] = []
    answers: list[tuple[int, int, bytes, bytes]] = []
    statuses: dict[str, int] = {}
    errors = sent = 0
    measuring = False
    stop_at = time.monotonic() + warmup + duration

    async def client(k: int) -> None:
        nonlocal errors, sent
        i = k
        connection = AnswerKeepingClient(url)
        try:
            while time.monotonic() < stop_at and sent < max_requests:
                index = i % len(requests)
                i += concurrency
                start = time.perf_counter()
                try:
                    status, head, body = await connection.exchange(requests[index])
                except Exception:  # noqa: BLE001 - counted, reported
                    if measuring:
                        errors += 1
                    continue
                answers.append((index, status, head, body))
                if measuring:
                    sent += 1
                    latencies.append(time.perf_counter() - start)
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
        finally:
            connection.close()

    tasks = [asyncio.create_task(client(k)) for k in range(concurrency)]
    await asyncio.sleep(warmup)
    server_before, machine_before, generator_before = tree_ticks(server_pid), machine_busy_ticks(), time.process_time()
    measuring = True
    began = time.monotonic()
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - began
    server_s = (tree_ticks(server_pid) - server_before) / CLOCK_TICKS_PER_S
    generator_s = time.process_time() - generator_before
    machine_s = (machine_busy_ticks() - machine_before) / CLOCK_TICKS_PER_S
    ok = statuses.get("200", 0)
    result = LevelResult(
        name,
        concurrency,
        round(elapsed, 2),
        sent,
        ok,
        statuses,
        errors,
        round(ok / elapsed, 1),
        round(sent / elapsed, 1),
        percentile_ms(latencies, 0.5),
        percentile_ms(latencies, 0.9),
        percentile_ms(latencies, 0.99),
        extra={
            "server_cpu_cores_used": round(server_s / elapsed, 2),
            "server_cpu_us_per_request": round(server_s / sent * 1e6) if sent else None,
            "generator_cpu_cores_used": round(generator_s / elapsed, 2),
            "others_cpu_cores_used": round(max(0.0, machine_s - server_s - generator_s) / elapsed, 2),
            "requests_sha256": requests_digest(requests, host),
        },
    )
    return result, check_answers(protocol, answers, images)
