"""The Python client (service.client) against a real `python -m service`: files, bytes, PIL images and tensors;
typed results; a 422 raised as a typed error; 503s (a deliberately tiny queue) retried after Retry-After to success."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from support import ServiceProcess, mnist_files, truncated_png

from service.client import (
    AsyncSoapClient,
    AuthenticationError,
    ClassifyResult,
    InvalidRequestError,
    ModelNotFoundError,
    RetryPolicy,
    SoapClient,
    image_payloads,
)

KEY = "client-test-key"


@pytest.fixture(scope="module")
def server(model_dir):
    """A tiny queue (4 images) that holds batches 300 ms: a burst of requests must meet 503s."""
    proc = ServiceProcess(
        ["--model", str(model_dir), "--max-queue", "4", "--max-batch-size", "4", "--max-delay-ms", "300"],
        {"SOAP_API_KEY_ENV": "SOAP_CLIENT_TEST_KEY", "SOAP_CLIENT_TEST_KEY": KEY},
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


class Counting(httpx.AsyncHTTPTransport):
    """The real transport, counting the status codes it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.statuses.append(response.status_code)
        return response


def test_classifies_files_bytes_pil_images_and_tensors(server):
    files = mnist_files(per_digit=1)[:4]
    path, data = files[0][1], files[1][1].read_bytes()
    pil = Image.open(files[2][1])
    tensor = torch.from_numpy(np.asarray(Image.open(files[3][1]), dtype=np.float32) / 255.0)[None]  # [1, 28, 28]
    with SoapClient(server.url, api_key=KEY) as soap:
        assert soap.ready()
        result = soap.classify([path, data, pil, tensor], top_k=3)
        assert isinstance(result, ClassifyResult)
        assert [p.label for p in result.predictions] == [d for d, _ in files]
        assert result.model == "mnist-fcn-dr"
        assert result.attempts == 1
        first = result.predictions[0]
        assert len(first.top_k) == 3
        assert first.top_k[0].label == first.label
        assert first.class_name == str(first.label)
        assert isinstance(first.suspicious, bool)
        assert first.epsilon >= 0
        fixed = soap.classify(str(path), mode="fixed", epsilon=0.1, return_curve=True)
        assert fixed.predictions[0].epsilon == pytest.approx(0.1)
        assert fixed.predictions[0].aux_curve is not None
        assert soap.model_info("mnist-fcn-dr")["input_shape"] == [1, 28, 28]


def test_a_bad_image_is_a_typed_422_and_auth_and_unknown_models_are_typed(server):
    with SoapClient(server.url, api_key=KEY) as soap:
        with pytest.raises(InvalidRequestError) as info:
            soap.classify(truncated_png())
        assert info.value.status == 422
        assert info.value.error == "bad_image"
        assert info.value.request_id
        with pytest.raises(InvalidRequestError) as info:
            soap.classify(mnist_files(1)[0][1], mode="fixed")  # fixed needs epsilon
        assert info.value.error == "bad_options"
        with pytest.raises(ModelNotFoundError):
            soap.classify(mnist_files(1)[0][1], model="no-such-model")
    with SoapClient(server.url, api_key="wrong") as soap, pytest.raises(AuthenticationError) as info:
        soap.classify(mnist_files(1)[0][1])
    assert info.value.status == 401


def test_503s_are_retried_after_retry_after_until_served(server):
    files = mnist_files(per_digit=2)[:16]
    transport = Counting()

    async def burst() -> list[ClassifyResult]:
        policy = RetryPolicy(max_retries=8, jitter=0.5)
        async with AsyncSoapClient(server.url, api_key=KEY, retry=policy, transport=transport) as soap:
            return await asyncio.gather(*(soap.classify(p) for _, p in files))

    results = asyncio.run(burst())
    assert [r.predictions[0].label for r in results] == [d for d, _ in files]
    assert 503 in transport.statuses  # the queue of 4 overflowed ...
    assert max(r.attempts for r in results) > 1  # ... and the refused requests were served on a retry
    assert transport.statuses.count(200) == len(files)
    assert set(transport.statuses) == {200, 503}


def test_retry_policy_honours_retry_after_with_bounded_jitter():
    policy = RetryPolicy(backoff_s=0.5, max_wait_s=30, jitter=0.25)
    waits = [policy.wait_s(0, 2.0) for _ in range(200)]
    assert min(waits) >= 2.0  # never earlier than the server asked
    assert max(waits) <= 2.5
    assert len(set(waits)) > 1  # jittered
    assert 0.5 <= policy.wait_s(0, None) <= 0.625  # no Retry-After: exponential backoff
    assert 2.0 <= policy.wait_s(2, None) <= 2.5
    assert policy.wait_s(10, 100.0) == 30  # capped


def test_image_payloads_turn_tensors_into_one_png_per_image():
    batch = torch.rand(3, 1, 28, 28)
    pngs = image_payloads(batch)
    assert len(pngs) == 3
    decoded = np.asarray(Image.open(io.BytesIO(pngs[1])), dtype=np.float32) / 255.0
    np.testing.assert_allclose(decoded, batch[1, 0].numpy(), atol=0.5 / 255 + 1e-6)  # 8-bit rounding only
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_payloads(torch.full((1, 28, 28), 2.0))
    with pytest.raises(TypeError):
        image_payloads([3.5])  # type: ignore[list-item]
