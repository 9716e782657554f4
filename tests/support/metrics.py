"""Reading the service's /metrics (Prometheus text exposition) in tests. A series that is not there is an error, not
a zero: otherwise `== 0` assertions would pass on a metric that was renamed or never exported."""

from __future__ import annotations

import re

_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class MissingSeries(LookupError):
    """No sample of that name with those labels in the exposition."""


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called exactly `name`."""
    found = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            head, _, value = line.rpartition(" ")
            found.append((dict(_LABEL.findall(head[len(name) :])), float(value)))
        elif line.startswith(name + " "):
            found.append(({}, float(line.rpartition(" ")[2])))
    return found


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the one sample called `name` whose labels include `labels`; MissingSeries if there is none."""
    every = samples(text, name)
    for sample_labels, value in every:
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    shown = ", ".join(str(s) for s, _ in every[:20]) or "none: no sample has that name"
    raise MissingSeries(f"no sample {name} with labels {labels} on /metrics; the samples of {name}: {shown}")
