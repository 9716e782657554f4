"""The PyTriton peer of benchmarks/peers.py: the predict step of `benchmarks.peers_job` behind NVIDIA PyTriton, that
is Triton Inference Server's C++ HTTP front end and dynamic batcher, on the same Open Inference Protocol requests as
the service's POST /v2/models/{name}/infer (input `images`, BYTES, shape [1, 1], the binary tensor data extension).

    python -m benchmarks.peers_pytriton --model models/zoo/mnist-fcn-dr --port 8001

Triton batches up to `--max-batch-size` requests, waiting at most `--queue-delay-us`, and hands each batch to one
of `--instances` model instances: Python threads of this process (PyTriton's layout), each with its own copy of the
model, running the predict step with one torch thread. Ready when GET /v2/models/{name}/ready answers 200. SIGTERM
stops Triton and its stub processes.

Two fixes to PyTriton 0.7.0 on this Python, both applied inside Triton's Python-backend stub (the process that
relays each batch to this one) by prefixing the proxy model file PyTriton hands to Triton:
- the stub runs the interpreter's standard library against a `_thread` module of its own whose RLock lacks
  `_recursion_count`, which Python 3.11.7's multiprocessing.resource_tracker calls: the tracker gets the standard
  library's pure-Python RLock instead;
- the stub is built against numpy 1's binary interface and reads bytes tensors as garbage with numpy 2 (PyTriton
  pins numpy<2, which the dev set does not follow): where this environment has numpy 2, the stub imports numpy 1
  from `STUB_NUMPY` (`pip install --target <venv>/pytriton-numpy1 'numpy<2'`, which `make install` runs)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.models.model import Model
from pytriton.triton import Triton, TritonConfig

from benchmarks.harness.ports import free_port
from benchmarks.peers_job import PeerJob

STUB_NUMPY = Path(sys.prefix) / "pytriton-numpy1"  # numpy<2 for the stub, beside this virtual environment


def stub_prelude() -> bytes:
    """Python run in the stub before PyTriton's proxy model (the fixes above)."""
    lines = []
    if int(np.__version__.split(".")[0]) >= 2:
        if not (STUB_NUMPY / "numpy").is_dir():
            raise SystemExit(
                f"PyTriton's stub needs numpy<2 and this environment has numpy {np.__version__}: "
                f"{sys.executable} -m pip install --target {STUB_NUMPY} 'numpy<2'"
            )
        lines.append(f"import sys; sys.path.insert(0, {str(STUB_NUMPY)!r})")
    lines += [
        "import _thread, threading",
        "if not hasattr(_thread.RLock(), '_recursion_count'):",
        "    from multiprocessing import resource_tracker",
        "    resource_tracker._resource_tracker._lock = threading._PyRLock()",
    ]
    return ("\n".join(lines) + "\n").encode()


def patch_proxy_model_files() -> None:
    """Prefix the proxy model file (model.py) that PyTriton sends Triton with `stub_prelude()`."""
    original = Model.get_proxy_model_files
    prelude = stub_prelude()

    def with_prelude(self: Model) -> dict[str, bytes]:
        files = original(self)
        key = f"file:{self.model_version}/model.py"
        files[key] = prelude + files[key]
        return files

    Model.get_proxy_model_files = with_prelude


def infer_function(job: PeerJob):
    """One model instance: a batch of encoded images ([n, 1] bytes) to labels and the predict step's outputs."""

    @batch
    def infer(images: np.ndarray) -> dict[str, np.ndarray]:
        predictions = job.predict([job.decode(bytes(row[0])) for row in images])
        return {
            "label": predictions.probs.argmax(dim=1).numpy().astype(np.int64).reshape(-1, 1),
            "probabilities": predictions.probs.numpy(),
            "epsilon": predictions.epsilon.numpy().reshape(-1, 1),
            "aux_loss": predictions.aux_after.numpy().reshape(-1, 1),
            "aux_loss_before": predictions.aux_before.numpy().reshape(-1, 1),
        }

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--instances", type=int, default=2, help="model instances (threads of this process)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--queue-delay-us", type=int, default=1000, help="the dynamic batcher's longest wait")
    args = parser.parse_args()

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # Triton.serve() stops the server on Ctrl+C

    signal.signal(signal.SIGTERM, stop)
    patch_proxy_model_files()
    jobs = [PeerJob.load(args.model) for _ in range(args.instances)]
    classes = len(jobs[0].class_names)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.port,
        grpc_address="127.0.0.1",
        grpc_port=free_port(),
        metrics_port=free_port(),
        allow_metrics=False,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=jobs[0].name,
            infer_func=[infer_function(job) for job in jobs],
            inputs=[Tensor(name="images", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="label", dtype=np.int64, shape=(1,)),
                Tensor(name="probabilities", dtype=np.float32, shape=(classes,)),
                Tensor(name="epsilon", dtype=np.float32, shape=(1,)),
                Tensor(name="aux_loss", dtype=np.float32, shape=(1,)),
                Tensor(name="aux_loss_before", dtype=np.float32, shape=(1,)),
            ],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
