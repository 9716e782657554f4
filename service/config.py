"""Service settings: one typed object, filled from the command line, then environment variables, then defaults.

Every option `--some-option` has the environment variable `SOAP_SOME_OPTION`; `--model` (repeatable) maps to
`SOAP_MODELS` (comma-separated). The first model is the default one. An empty variable counts as unset.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "SOAP_"


class ServiceSettings(BaseModel):
    """Everything the service reads at start. Field docs double as `--help` text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[Path] = Field(min_length=1, description="checkpoint folders; the first is the default model")
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    max_batch_size: int = Field(64, ge=1, le=4096, description="images per batch (a batch goes when full ...)")
    max_delay_ms: float = Field(5.0, ge=0, le=10_000, description="... or when its oldest image has waited this long")
    max_queue: int = Field(512, ge=1, description="images waiting per model before new requests get 503")
    request_timeout_s: float = Field(10.0, gt=0, description="deadline for a request's work to start, else 504")
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest request body (413 beyond)")
    body_timeout_s: float = Field(30.0, gt=0, description="longest time a request body may take to arrive (408 beyond)")
    max_images_per_request: int = Field(64, ge=1, description="most images in one request (413 beyond)")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="most pixels in one decoded image (decompression-bomb guard)"
    )
    max_image_side: int = Field(8192, ge=1, description="longest accepted image side in pixels")
    api_key_env: str | None = Field(
        None, description="name of the environment variable holding the API key (off when unset)"
    )
    protect_metrics: bool = Field(False, description="require the API key on /metrics too")
    enable_attack: bool = Field(False, description="enable the demo attack endpoint POST /v1/attack")
    shutdown_delay_s: float = Field(
        0.0, ge=0, description="on SIGTERM, report not-ready this long before closing the listener"
    )
    graceful_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM, longest wait for accepted requests to finish"
    )
    compute_process: bool = Field(
        True,
        description="run each model's purification in a child process, which shares no GIL with the event loop (--no-compute-process: a thread)",
    )
    compute_workers: int | None = Field(
        None,
        ge=1,
        le=256,
        description="compute workers per model, each a child process fed batches by the batcher (default: one per "
        "CPU core on the CPU, one on a GPU, one with --no-compute-process)",
    )
    compute_nice: int = Field(
        0, ge=0, le=19, description="niceness added to the compute processes (higher: the event loop goes first)"
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch may use per worker (default: the cores shared among the workers; in a thread: "
        "all cores but one, left to the event loop)",
    )
    access_log: bool = Field(False, description="log every request (off: the metrics cover it, and it costs CPU)")
    log_level: str = Field("info", description="uvicorn log level")

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {v!r}")

    @field_validator("models")
    @classmethod
    def _names_unique(cls, v: list[Path]) -> list[Path]:
        names = [p.name for p in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names (checkpoint folder names) must be unique; repeated: {dupes}")
        return v

    def pool_size(self, cuda: bool = False) -> int:
        """Compute workers per model: as configured, else one process per core on the CPU (on 2 cores two one-thread
        processes purify MNIST faster than one two-thread process, and the kernel gives the event loop its share),
        one on a GPU (it computes one batch at a time anyway), one thread without compute processes."""
        if self.compute_workers:
            return self.compute_workers
        if cuda or not self.compute_process:
            return 1
        return _cores()

    @property
    def compute_threads(self) -> int:
        """torch's CPU threads per worker: as configured, else the cores shared among the CPU workers; with the
        compute in a thread of the server, all cores but one, which stays free for the event loop (on a 2-core
        host, 1 thread purified MNIST batches as fast as 2 and halved the p99 of 503s under overload)."""
        if self.torch_threads:
            return self.torch_threads
        if not self.compute_process:
            return max(1, _cores() - 1)
        return max(1, _cores() // self.pool_size())

    @property
    def model_names(self) -> list[str]:
        return [p.name for p in self.models]

    @property
    def api_key(self) -> str | None:
        """The key itself, read from the environment at call time (never stored in the settings)."""
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ValueError(
                f"--api-key-env names {self.api_key_env!r}, but that environment variable is empty or unset"
            )
        return key


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_FLAGS = {name: "--" + name.replace("_", "-") for name in ServiceSettings.model_fields if name != "models"}


def _env_name(field: str) -> str:
    return ENV_PREFIX + ("MODELS" if field == "models" else field.upper())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="SOAP inference service: purify every image with min-aux SOAP, then classify it.",
        epilog=f"Every option can also be set with an environment variable {ENV_PREFIX}<OPTION> "
        f"(e.g. {ENV_PREFIX}MAX_BATCH_SIZE); --model maps to {ENV_PREFIX}MODELS, comma-separated.",
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="PATH",
        help="checkpoint folder (repeatable; the first is the default model; name = folder name)",
    )
    for name, flag in _FLAGS.items():
        field = ServiceSettings.model_fields[name]
        if field.annotation is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=field.description
            )
        else:
            parser.add_argument(flag, dest=name, default=None, help=f"{field.description} (default {field.default})")
    return parser


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServiceSettings:
    """Command line over environment over defaults. Raises SystemExit(2) with a readable message on bad values."""
    environ = os.environ if environ is None else environ
    parser = _parser()
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    for name in ServiceSettings.model_fields:
        if args.get(name) is not None:
            values[name] = args[name]
        elif environ.get(_env_name(name), "").strip():  # an empty variable counts as unset (compose's ${X:-})
            raw = environ[_env_name(name)]
            values[name] = [p.strip() for p in raw.split(",") if p.strip()] if name == "models" else raw
    if not values.get("models"):
        parser.error(f"no model: give --model PATH (repeatable) or set {ENV_PREFIX}MODELS")
    try:
        return ServiceSettings(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits
