"""tests/support/metrics.py reads a real Prometheus exposition (prometheus_client's, as the service serves it): a
series that is not there raises instead of reading as 0, so an `== 0` assertion fails on a renamed metric or label."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from support import MissingSeries, metric_value


def exposition() -> str:
    registry = CollectorRegistry()
    rejections = Counter("soap_rejections", "refused requests", ["model", "reason"], registry=registry)
    rejections.labels(model="mnist-fcn-dr", reason="queue_full").inc(2)
    rejections.labels(model="mnist-fcn-dr", reason="deadline")  # declared, not counted yet: 0
    Gauge("soap_ready", "1 when ready", registry=registry).set(1)
    Counter("soap_unlabelled", "never counted", ["model"], registry=registry)  # no child: no sample at all
    return generate_latest(registry).decode()


def test_metric_value_reads_the_sample_with_the_labels_asked_for() -> None:
    text = exposition()
    assert metric_value(text, "soap_rejections_total", model="mnist-fcn-dr", reason="queue_full") == 2
    assert metric_value(text, "soap_rejections_total", reason="deadline") == 0
    assert metric_value(text, "soap_ready") == 1


@pytest.mark.parametrize(
    ("name", "labels"),
    [
        ("soap_rejection_total", {}),  # a renamed metric
        ("soap_rejections_total", {"reason": "queue-full"}),  # a renamed label value
        ("soap_rejections_total", {"cause": "queue_full"}),  # a renamed label
        ("soap_unlabelled_total", {"model": "mnist-fcn-dr"}),  # declared, but no series was ever created
    ],
)
def test_metric_value_raises_on_a_series_that_is_not_exported(name: str, labels: dict[str, str]) -> None:
    with pytest.raises(MissingSeries, match=name):
        metric_value(exposition(), name, **labels)
