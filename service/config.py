"""Service settings (`python -m service` or `soap-serve`) on pydantic-settings: one typed object, filled from the
command line, then `SOAP_*` environment variables, then defaults.

Every option `--some-option` has the environment variable `SOAP_SOME_OPTION`; `--model` (repeatable) maps to
`SOAP_MODELS` (comma-separated). The first model is the default one. An empty (or blank) variable counts as unset.
The API key never comes from the command line (it would show in `ps`): `--api-key-env NAME` names an environment
variable that holds it, `--api-key-file PATH` a file (a mounted Kubernetes or Docker secret).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from models import Acceleration, Precision, __version__

from .logs import LogFormat

ENV_PREFIX = "SOAP_"

# The environment the settings read: os.environ, or the mapping given to load_settings() for one call.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("soap_settings_environ", default=None)


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over `_ENVIRON` (default os.environ); blank values count as unset
    (compose's `${X:-}` passes empty strings)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        environ = os.environ if environ is None else environ
        present = {k: v for k, v in environ.items() if v.strip()}
        return parse_env_vars(present, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


class ServiceSettings(BaseSettings):
    """Everything the service reads at start. Field descriptions double as `--help` text."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        cli_kebab_case=True,
        cli_implicit_flags=True,  # bools: --flag / --no-flag
        cli_shortcuts={"models": "model"},
        cli_hide_none_type=True,
        cli_avoid_json=True,
    )

    models: Annotated[list[Path], NoDecode] = Field(
        min_length=1,
        description="checkpoint folder (repeatable: --model A --model B; SOAP_MODELS=A,B); the first is the default "
        "model; a model's name is its folder name",
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")
    max_batch_size: int = Field(64, ge=1, le=4096, description="images per batch (a batch goes when full ...)")
    max_delay_ms: float = Field(1.0, ge=0, le=10_000, description="... or when its oldest image has waited this long")
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
    api_key_file: Path | None = Field(
        None, description="file holding the API key, e.g. a mounted Kubernetes or Docker secret (off when unset)"
    )
    protect_metrics: bool = Field(False, description="require the API key on /metrics too")
    enable_attack: bool = Field(False, description="enable the demo attack endpoint POST /v1/attack")
    head_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="longest time a client may take to send a request's head (line and headers), from its connect "
        "or from the first byte of its next request; then 408 and the connection is closed",
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, le=3600, description="an idle keep-alive connection is closed after this long without a request"
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        description="most open connections (default, and never more than: what the open-file limit leaves); at "
        "the cap a new connection replaces the one waiting longest for a request head, or gets a fast 503 when all "
        "are carrying requests",
    )
    shutdown_delay_s: float = Field(
        0.0, ge=0, description="on SIGTERM, report not-ready this long before closing the listener"
    )
    graceful_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM, longest wait for accepted requests to finish"
    )
    compute_process: bool = Field(
        True,
        description="run each model's purification in a child process, which shares no GIL with the event loop "
        "(--no-compute-process: a thread)",
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
    purifier_precision: Precision = Field(
        Precision.FLOAT32,
        description="precision of the purifier's auxiliary loss: bfloat16 runs it under autocast (off by default: on "
        "the CPU it chose the same ε for only 86 of 100 MNIST test digits; benchmarks/gpu_check.py measures the GPU)",
    )
    compile_purifier: bool = Field(
        False,
        description="compile the purifier's auxiliary loss with torch.compile (the first batch of each shape "
        "compiles; off until measured on a GPU)",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch may use per worker (default: the cores shared among the workers; in a thread: "
        "all cores but one, left to the event loop)",
    )
    max_certify_samples: int = Field(
        100_000, ge=1, description="mode=certify: most noise samples per image a request may ask for (422 beyond)"
    )
    default_certify_samples: int = Field(10_000, ge=1, description="mode=certify: samples when a request names none")
    max_certify_queue_samples: int = Field(
        2_000_000, ge=1, description="mode=certify: forward passes (images × samples) queued per model (503 beyond)"
    )
    certify_slice_samples: int = Field(
        2_000, ge=1, description="mode=certify: noise samples per image between two looks at the purification queue"
    )
    certify_share: float = Field(
        0.5, gt=0, le=1, description="mode=certify: largest share of time certification takes while purification waits"
    )
    certify_batch: int = Field(1_000, ge=1, description="mode=certify: noisy copies per forward pass (memory bound)")
    access_log: bool = Field(False, description="log every request (off: the metrics cover it, and it costs CPU)")
    log_level: str = Field("info", description="uvicorn log level")
    log_format: LogFormat = Field(
        LogFormat.TEXT, description="text, or json: one JSON object per line, with the request id on each"
    )
    tracing: bool = Field(
        False,
        description="OpenTelemetry spans for /classify: read, decode, queue wait, compute, encode (needs the tracing "
        "extra; exported over OTLP when opentelemetry-exporter-otlp-proto-http is installed)",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments (load_settings passes the command line ahead of them) over the environment; no
        .env file and no secrets directory (the one secret, the API key, has --api-key-env / --api-key-file)."""
        return init_settings, _EnvSource(settings_cls)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v: Any) -> Any:
        if isinstance(v, str):  # SOAP_MODELS=a,b (the command line's repeated --model arrives joined the same way)
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

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
        """Compute workers per model: as configured, else on the CPU one process per usable core, within the
        container's CPU and memory limits (on 2 cores two one-thread processes purify MNIST faster than one
        two-thread process, and the kernel gives the event loop its share); one on a GPU (it computes one batch at a
        time anyway); one thread without compute processes."""
        if self.compute_workers:
            return self.compute_workers
        if cuda or not self.compute_process:
            return 1
        # Capped by memory: one worker per GiB beyond the first (the server's own process).
        return max(1, min(_cores(), _memory_bytes() // WORKER_MEMORY_BYTES - 1))

    @model_validator(mode="after")
    def _one_key_source(self) -> ServiceSettings:
        if self.api_key_env and self.api_key_file:
            raise ValueError("give the API key one way: --api-key-env or --api-key-file, not both")
        return self

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
    def acceleration(self) -> Acceleration:
        """How the compute workers evaluate the purifier's auxiliary loss (models.acceleration)."""
        return Acceleration(precision=self.purifier_precision, compile=self.compile_purifier)

    @property
    def model_names(self) -> list[str]:
        return [p.name for p in self.models]

    @property
    def api_key(self) -> str | None:
        """The key itself, read from its variable or file at call time (never stored in the settings); None when
        no key is configured. Raises ValueError when the named variable or file is empty or unreadable."""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise ValueError(
                    f"--api-key-env names {self.api_key_env!r}, but that environment variable is empty or unset"
                )
            return key
        if self.api_key_file:
            try:
                key = self.api_key_file.read_text().strip()  # a secret file usually ends with a newline
            except OSError as exc:
                raise ValueError(f"--api-key-file {self.api_key_file}: cannot read it ({exc.strerror})") from None
            if not key:
                raise ValueError(f"--api-key-file {self.api_key_file} is empty")
            return key
        return None


CGROUP = Path("/sys/fs/cgroup")
WORKER_MEMORY_BYTES = 1 << 30  # per compute process: ~600 MB resident measured (mostly torch), plus batches


def cgroup_cpus(root: Path = CGROUP) -> float | None:
    """The container's CPU limit in cores (cgroup v2 cpu.max or v1 cfs quota), None when unlimited or unknown."""
    try:
        if (root / "cpu.max").exists():
            quota, period = (root / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def cgroup_memory_bytes(root: Path = CGROUP) -> int | None:
    """The container's memory limit (cgroup v2 memory.max or v1 limit_in_bytes), None when unlimited or unknown."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= 1 << 60:  # v1 writes a huge number for "none"
            return None
        return int(text)
    return None


def usable_cores(affinity: int, cpu_limit: float | None) -> int:
    """Cores a process may use: its CPU affinity, capped by a container's CPU limit rounded to the nearest core
    (at least one). A pod limited to 4 CPUs on a 64-core node sees 64 cores in its affinity mask."""
    return max(1, min(affinity, int(cpu_limit + 0.5))) if cpu_limit is not None else affinity


def _cores() -> int:
    """Cores this process may use (usable_cores of its affinity and its container's CPU quota)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return usable_cores(affinity, cgroup_cpus())


def _memory_bytes() -> int:
    """Memory this process may use: a container's limit, else the machine's RAM."""
    limit = cgroup_memory_bytes()
    if limit is not None:
        return limit
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _parser() -> argparse.ArgumentParser:
    script = os.path.basename(sys.argv[0])  # `soap-serve` when started by the console script
    parser = argparse.ArgumentParser(
        prog="python -m service" if script in ("__main__.py", "") else script,
        description="SOAP inference service: purify every image with min-aux SOAP, then classify it.",
        epilog=f"Every option can also be set with an environment variable {ENV_PREFIX}<OPTION> "
        f"(e.g. {ENV_PREFIX}MAX_BATCH_SIZE); --model maps to {ENV_PREFIX}MODELS, comma-separated. "
        "The command line wins over the environment.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s (soap-serving) {__version__}")
    return parser


@contextmanager
def _environment(environ: Mapping[str, str] | None) -> Iterator[None]:
    token = _ENVIRON.set(environ)
    try:
        yield
    finally:
        _ENVIRON.reset(token)


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServiceSettings:
    """Command line over environment (os.environ unless given) over defaults. Raises SystemExit(2) with a
    readable message on bad values, SystemExit(0) after --help or --version."""
    parser = _parser()
    cli: CliSettingsSource[argparse.Namespace] = CliSettingsSource(ServiceSettings, root_parser=parser)
    args = list(sys.argv[1:] if argv is None else argv)
    with _environment(environ):
        try:
            return ServiceSettings(_cli_settings_source=cli(args=args))
        except ValidationError as exc:
            problems = []
            for e in exc.errors(include_url=False):
                if e["type"] == "missing" and tuple(e["loc"]) == ("models",):
                    problems.append(f"no model: give --model PATH (repeatable) or set {ENV_PREFIX}MODELS")
                else:
                    where = (
                        "--" + "-".join(str(part) for part in e["loc"]).replace("_", "-") if e["loc"] else "settings"
                    )
                    problems.append(f"{where}: {e['msg']}")
            parser.error("; ".join(problems))
