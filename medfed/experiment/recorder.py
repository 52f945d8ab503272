"""Per-round, per-site metrics of a run, appended to ``metrics.jsonl`` (one JSON object a line).

Each line: ``arm``, ``phase``, ``round``, ``site`` (an int, or ``"global"``), ``split``
(train, val or test; ``test-share``: the federated evaluation of a site without val data, on its share of the
test split), ``accepted`` (train replies), then the metric values. An optional
listener sees every line as it is written (the CLI's progress display uses it).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.constants import Phase
from medfed.strategies.replies import EVALUATE_ON_TEST
from medfed.strategies.shared_weights import SiteReport

Listener = Callable[[dict[str, Any]], None]
GLOBAL = "global"
TEST_SHARE_SPLIT = "test-share"  # a site without val data: federated evaluation on its share of the test split


def json_safe(value: Any) -> Any:
    """NaN and infinities become null (JSON has no NaN; null means "undefined", e.g. an AUC
    on a one-class subset), recursively through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class Recorder:
    """Thread-safe writer of metrics.jsonl; keeps the rows in memory for the report."""

    def __init__(self, path: Path, listener: Listener | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.listener = listener
        self._lock = threading.Lock()

    def write(self, row: dict[str, Any]) -> None:
        row = json_safe(row)
        with self._lock:
            self.rows.append(row)
            with self.path.open("a") as fh:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        if self.listener is not None:
            self.listener(row)

    def site_observer(self, arm: str) -> Callable[[SiteReport], None]:
        """Adapter for the strategy's per-site reports."""

        def observe(report: SiteReport) -> None:
            row: dict[str, Any] = {
                "arm": arm,
                "phase": report.phase.value,
                "round": report.server_round,
                "site": report.site_id,
                "split": {"train": "train", EVALUATE_ON_TEST: TEST_SHARE_SPLIT}.get(report.kind, "val"),
                "accepted": report.accepted,
            }
            if report.reason:
                row["reason"] = report.reason
            if report.bytes_sent:
                row["bytes-sent"] = report.bytes_sent
            row.update(report.metrics)
            self.write(row)

        return observe

    def record(
        self, arm: str, phase: Phase, server_round: int, site: int | str, split: str, metrics: dict[str, float]
    ) -> None:
        self.write({"arm": arm, "phase": phase.value, "round": server_round, "site": site, "split": split, **metrics})

    @staticmethod
    def load(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
