"""The LitServe peer of benchmarks/peers.py: the predict step of `benchmarks.peers_job` behind LitServe, on the same
JSON requests as the service's POST /classify (`{"images": ["<base64>"]}`, same path) and answering with the same
result fields.

    python -m benchmarks.peers_litserve --model models/zoo/mnist-fcn-dr --port 8001

LitServe's own layout: an HTTP front end (uvicorn + FastAPI, `--api-servers` processes, LitServe's default: one per
worker) hands parsed requests to `--workers` inference processes over queues; each decodes, batches up to
`--max-batch-size` requests waiting at most `--batch-timeout-ms`, and runs the predict step with one torch thread.
Ready when GET /health answers 200 (every worker set up). SIGTERM stops it (its workers too)."""

from __future__ import annotations

import argparse
import base64
import signal

import litserve as ls
import torch

from benchmarks.peers_job import PeerJob
from service.predict import Predictions


class SoapLitAPI(ls.LitAPI):
    """One LitServe worker: decode in decode_request, the predict step on the batch, one result per request."""

    def __init__(self, model_dir: str, **options: object) -> None:
        super().__init__(**options)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        self.job = PeerJob.load(self.model_dir)

    def decode_request(self, request: dict, **kwargs: object) -> torch.Tensor:
        (image,) = request["images"]  # one image per request, as the benchmark sends
        return self.job.decode(base64.b64decode(image))

    def batch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return inputs

    def predict(self, x: list[torch.Tensor], **kwargs: object) -> Predictions:
        return self.job.predict(x)

    def unbatch(self, output: Predictions) -> list[dict]:
        return [self.job.result(output, row) for row in range(len(output))]

    def encode_response(self, output: dict, **kwargs: object) -> dict:
        return {"model": self.job.name, "results": [output]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2, help="inference worker processes")
    parser.add_argument("--api-servers", type=int, default=None, help="HTTP front-end processes (default: LitServe's)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    args = parser.parse_args()

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # LitServe shuts its workers and front ends down on Ctrl+C

    signal.signal(signal.SIGTERM, stop)
    api = SoapLitAPI(
        args.model, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000, api_path="/classify"
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers, timeout=60)
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=args.api_servers,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
