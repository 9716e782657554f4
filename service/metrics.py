"""Prometheus metrics of the service. Names and labels are a contract (listed in docs/service.md, "Metrics") with the
deployment's dashboards and alert rules and the demo page: change them only together (tests/test_deploy_live.py checks
the dashboards and rules against what the running service exports).

Each app gets its own CollectorRegistry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

import os
import subprocess
from enum import StrEnum
from functools import cache
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from models import __version__

disable_created_metrics()  # the *_created series double the exposition and nobody reads them

# ~1 ms (MNIST on a GPU) to ~30 s (CIFAR WRN on CPU, large batches).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
EPSILON_BUCKETS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
AUX_LOSS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Certified L2 radii (pixel scale [0, 1]); σ = 0.5 with n = 10,000 and α = 0.001 cannot certify beyond ~1.6.
RADIUS_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
CERTIFY_OUTCOMES = ("certified", "abstained")


class Rejection(StrEnum):
    """The `reason` label of soap_rejections_total: why a request was refused (service/errors.py sets it)."""

    QUEUE_FULL = "queue_full"
    DEADLINE = "deadline"
    CLIENT_GONE = "client_gone"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BAD_IMAGE = "bad_image"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    BAD_OPTIONS = "bad_options"
    UNAUTHORIZED = "unauthorized"
    BODY_TIMEOUT = "body_timeout"


REJECTION_REASONS = tuple(str(reason) for reason in Rejection)


class ServiceMetrics:
    """The metric objects; the request path calls them directly (a handful of microseconds per request)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "soap_request_duration_seconds",
            "Time from request start to response, by model, route and HTTP status.",
            ["model", "route", "status"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "soap_queue_wait_seconds",
            "Time an accepted request waited in the queue before its batch started.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_compute = Histogram(
            "soap_batch_compute_seconds",
            "Wall time of one batch: purification plus classification.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "soap_batch_size_images", "Images per executed batch.", ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.epsilon = Histogram(
            "soap_purification_epsilon",
            "Purification budget chosen per image (L-infinity, pixel scale [0, 1]).",
            ["model"],
            buckets=EPSILON_BUCKETS,
            registry=r,
        )
        self.aux_before = Histogram(
            "soap_aux_loss_before",
            "Auxiliary (self-supervised) loss of each image before purification.",
            ["model"],
            buckets=AUX_LOSS_BUCKETS,
            registry=r,
        )
        self.aux_after = Histogram(
            "soap_aux_loss_after",
            "Auxiliary loss of each image after purification.",
            ["model"],
            buckets=AUX_LOSS_BUCKETS,
            registry=r,
        )
        self.rejections = Counter("soap_rejections", "Requests refused, by reason.", ["model", "reason"], registry=r)
        self.queue_depth = Gauge(
            "soap_queue_depth_images", "Images waiting in the model's queue.", ["model"], registry=r
        )
        self.suspicious = Counter(
            "soap_suspicious_inputs",
            "Images whose auxiliary loss before purification exceeded the calibrated clean quantile.",
            ["model"],
            registry=r,
        )
        self.images = Counter("soap_images", "Images classified, by purification mode.", ["model", "mode"], registry=r)
        self.certify_requests = Counter(
            "soap_certify_requests", "Certify requests answered (mode=certify).", ["model"], registry=r
        )
        self.certify_images = Counter(
            "soap_certify_images",
            "Images certified, by outcome (certified or abstained).",
            ["model", "outcome"],
            registry=r,
        )
        self.certified_radius = Histogram(
            "soap_certified_radius",
            "Certified L2 radius per non-abstaining image (pixel scale [0, 1]).",
            ["model"],
            buckets=RADIUS_BUCKETS,
            registry=r,
        )
        self.certify_compute = Histogram(
            "soap_certify_compute_seconds",
            "Forward-pass time of one certify request (pauses for purification excluded).",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.certify_queue = Gauge(
            "soap_certify_queue_samples", "Forward passes waiting in the model's certify lane.", ["model"], registry=r
        )
        self.model_info = Gauge(
            "soap_model_info",
            "Loaded models (value 1).",
            ["model", "network", "dataset", "aux_task", "device"],
            registry=r,
        )
        self.ready = Gauge(
            "soap_ready", "1 when every model is loaded and warmed up and the service is not shutting down.", registry=r
        )
        self.in_flight = Gauge(
            "soap_in_flight_requests",
            "HTTP requests being served now (probes and /metrics excluded): the per-replica load autoscaling reads.",
            registry=r,
        )
        self.batch_failures = Counter(
            "soap_batch_failures",
            "Batches whose compute raised (every request in them got 500).",
            ["model"],
            registry=r,
        )
        self.compute_restarts = Counter(
            "soap_compute_restarts",
            "Compute children started again after one died or failed (the first start is not counted).",
            ["model", "worker"],
            registry=r,
        )
        self.build_info = Gauge(
            "soap_build_info",
            "The running build (value 1): package version and source commit.",
            ["version", "commit"],
            registry=r,
        )
        self.build_info.labels(*build_info()).set(1)

    def declare_model(self, model: str, modes: tuple[str, ...]) -> None:
        """Create every labelled series of `model` at zero, so dashboards and rate() see 0, not "No data",
        before the first rejection, suspicious input or request of a mode."""
        for reason in REJECTION_REASONS:
            self.rejections.labels(model, reason)
        for mode in modes:
            self.images.labels(model, mode)
        self.suspicious.labels(model)
        self.batch_failures.labels(model)
        self.certify_requests.labels(model)
        for outcome in CERTIFY_OUTCOMES:
            self.certify_images.labels(model, outcome)
        self.certify_queue.labels(model).set(0)
        for histogram in (
            self.certified_radius,
            self.certify_compute,
            self.queue_wait,
            self.batch_compute,
            self.batch_size,
            self.epsilon,
            self.aux_before,
            self.aux_after,
        ):
            histogram.labels(model)
        self.queue_depth.labels(model).set(0)

    def reject(self, model: str, reason: Rejection) -> None:
        self.rejections.labels(model, reason).inc()


@cache
def build_info() -> tuple[str, str]:
    """(version, commit): the package's version; the commit from $BUILD_COMMIT (set when the image is built), else
    `git rev-parse` when running from a checkout, else "unknown"."""
    commit = os.environ.get("BUILD_COMMIT", "").strip()
    if not commit:
        try:
            result = subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=5,
            )
            commit = result.stdout.strip() if result.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            commit = ""
    return __version__, commit or "unknown"
