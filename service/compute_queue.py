"""The one interface the request path hands work to: `ComputeQueue`, which the purification Batcher
(service/batcher.py) and the CertifyLane (service/certify.py) both implement, and the `Ticket` it gives back.
service/pipeline.py submits to either and awaits the ticket the same way (deadline, disconnect, cancel).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, TypeVar

import torch

RequestT = TypeVar("RequestT", contravariant=True)
ResultT = TypeVar("ResultT")
TicketT = TypeVar("TicketT", bound="Ticket[Any]")


class Ticket(Protocol[ResultT]):
    """A piece of work handed to a ComputeQueue: its future ends with the result (or the error that ended it)."""

    @property
    def future(self) -> asyncio.Future[ResultT]: ...


class ComputeQueue(Protocol[RequestT, TicketT]):
    """`submit` queues one request's images under a deadline, or raises QueueFull / ShuttingDown (service/batcher.py)
    at once; `cancel` takes a still-queued ticket out (deadline passed, client gone) and ends its future with `error`
    (cancelled when None); False once its compute started (the result will come)."""

    def submit(self, images: torch.Tensor, request: RequestT, deadline: float, request_id: str = "", /) -> TicketT: ...

    def cancel(self, ticket: TicketT, error: BaseException | None = None, /) -> bool: ...
