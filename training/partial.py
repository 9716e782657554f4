"""Per-attack, per-batch partial results on disk, so that an interrupted evaluation resumes where it stopped.

A batch's record is stored under OUT/.partial/<fingerprint>/<attack>-<start>-<stop>.pt. The fingerprint covers
everything that decides a batch's outcome (weights, data, settings, seed, β, batch size, threshold), so records
of another configuration are never reused; the image count n does not enter it, so a larger n reuses the
batches already done. Records are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .rows import Row


@dataclass
class BatchRecord:
    """One attack on one batch of images [start, stop): per-row correctness and what the table reports."""

    start: int
    stop: int
    correct: dict[Row, torch.Tensor]
    flagged: torch.Tensor | None  # the detector fired on the adversarial image (aux loss above the threshold)
    seconds: float
    max_linf: float
    max_l2: float
    out_of_range: int
    kept: torch.Tensor | None = None  # the first adversarial images of batch 0, for the figures
    resumed: bool = False  # read back from PartialResults (computed by an earlier run), not computed now


def fingerprint(weights: Path, **config: object) -> str:
    """Digest of the checkpoint's weights and of the JSON form of `config`."""
    h = hashlib.sha256()
    with weights.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class PartialResults:
    def __init__(self, root: Path, key: str):
        self.folder = root / ".partial" / key

    def _path(self, attack: str, start: int, stop: int) -> Path:
        return self.folder / f"{attack}-{start}-{stop}.pt"

    def load(self, attack: str, start: int, stop: int) -> BatchRecord | None:
        path = self._path(attack, start, stop)
        if not path.exists():
            return None
        return BatchRecord(**{**torch.load(path, weights_only=True), "resumed": True})

    def save(self, attack: str, record: BatchRecord) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(attack, record.start, record.stop)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(asdict(record), tmp)
        tmp.replace(path)
