"""What sites reply to a round, and the contract those replies must hold.

A train reply holds exactly one ArrayRecord with the shared weights (the keys the server expects, each
with the shape and dtype it sent, finite values) and one MetricRecord of scalars with ``num-examples``
and ``site-id``; a refusal holds no arrays and a ``refusal`` ConfigRecord with the reason. An evaluate
reply holds scalar metrics (and the score histograms of `medfed.task.calibration`); a site without validation
data evaluates on its share of the test split instead, says so (``evaluated-on-test`` 1) and sends no histograms.

Metrics across sites: losses and evaluation metrics are example-weighted means; privacy metrics are the
MAX over sites (the federation is as private as its most exposed site; Flower's default, an
example-weighted mean, would understate it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.typing import MetricRecordValues

from medfed.constants import MetricKey, Phase, RecordKey
from medfed.task.calibration import HISTOGRAM_KEYS, histogram_problem


@dataclass(frozen=True)
class SiteReport:
    """What the strategy tells its observer about one site in one round."""

    phase: Phase
    server_round: int
    kind: str  # "train", "evaluate" (validation data) or `EVALUATE_ON_TEST` (a site without val: its test share)
    site_id: int
    node_id: int
    metrics: dict[str, float]
    accepted: bool
    reason: str = ""
    bytes_sent: int = 0


EVALUATE_ON_TEST = "evaluate-on-test"
"""A `SiteReport` kind: the federated evaluation of a site without validation data, on its share of the test split
(recorded apart from validation, never in the threshold calibration nor the validation averages)."""

Observer = Callable[[SiteReport], None]
ReleaseObserver = Callable[[int, dict[str, float]], None]  # (round, central-DP figures of the release)


def metric_scalar(value: MetricRecordValues) -> int | float:
    """A metric value the reply contract makes a scalar, as it is; a list raises TypeError (as float() of it would)."""
    if isinstance(value, list):
        raise TypeError(f"expected a scalar metric, got a list: {value!r}")
    return value


def check_reply(content: RecordDict, sent: ArrayRecord, expected_keys: list[str]) -> str:
    """Return why a train reply breaks the contract, or '' if it holds."""
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, found {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, found {len(content.metric_records)}"
    if content.config_records:
        return f"unexpected ConfigRecord(s) {sorted(content.config_records)} in a train reply"
    arrays = next(iter(content.array_records.values()))
    keys = list(arrays.keys())
    if set(keys) != set(expected_keys):
        extra = sorted(set(keys) - set(expected_keys))
        missing = sorted(set(expected_keys) - set(keys))
        return f"array keys differ from the shared weights: unexpected {extra[:5]}, missing {missing[:5]}"
    for key in keys:
        got, want = arrays[key], sent[key]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            return f"array {key!r} is {got.dtype}{tuple(got.shape)}, expected {want.dtype}{tuple(want.shape)}"
        values = got.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array {key!r} holds NaN or infinite values"
    metrics = next(iter(content.metric_records.values()))
    for key in (MetricKey.NUM_EXAMPLES, MetricKey.SITE_ID):
        if key not in metrics:
            return f"metric {key.value!r} missing"
    for key, value in metrics.items():
        if isinstance(value, list):
            return f"metric {key!r} is a list; sites may only send scalar metrics"
    n = metric_scalar(metrics[MetricKey.NUM_EXAMPLES])  # lists were refused above
    if not (np.isfinite(n) and float(n).is_integer() and n > 0):
        return f"num-examples must be a whole number > 0; got {n}"
    return ""


def check_evaluate_reply(content: RecordDict) -> str:
    """Return why an evaluate reply breaks the contract (it may hold scalar metrics only), or ''."""
    if content.array_records:
        return "an evaluate reply must not carry arrays"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, found {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    lists = sorted(k for k, v in metrics.items() if isinstance(v, list) and k not in HISTOGRAM_KEYS)
    if lists:
        return f"evaluate metrics must be scalars (apart from the score histograms); {lists[0]!r} is a list"
    if MetricKey.NUM_EXAMPLES not in metrics or MetricKey.SITE_ID not in metrics:
        return "evaluate metrics need num-examples and site-id"
    if evaluated_on_test(metrics) and any(k in metrics for k in HISTOGRAM_KEYS):
        return "a site evaluated on its test share must not send validation score histograms"
    return histogram_problem(dict(metrics), float(metric_scalar(metrics[MetricKey.NUM_EXAMPLES])))


def evaluated_on_test(metrics: dict[str, float] | MetricRecord) -> bool:
    """Whether an evaluate reply's metrics are of the site's test share (it has no validation data), not of its
    validation split."""
    value = metrics.get(MetricKey.EVALUATED_ON_TEST.value, 0.0)
    return not isinstance(value, list) and float(value) != 0.0


def scalar_metrics(content: RecordDict) -> dict[str, float]:
    """The scalar metrics of a reply (lists, which the contract forbids, are left out)."""
    if not content.metric_records:
        return {}
    record = next(iter(content.metric_records.values()))
    return {k: float(v) for k, v in record.items() if not isinstance(v, list)}


def update_arrays(msg: Message) -> dict[str, np.ndarray]:
    """The arrays of a (checked) train reply as numpy, by key."""
    record = next(iter(msg.content.array_records.values()))
    return {key: array.numpy() for key, array in record.items()}


PRIVACY_MAX_KEYS = (MetricKey.EPSILON, MetricKey.DELTA)
DP_REPLY_KEYS = (
    MetricKey.EPSILON, MetricKey.DELTA, MetricKey.NOISE_MULTIPLIER, MetricKey.SAMPLE_RATE, MetricKey.DP_STEPS,
)
"""Privacy metrics aggregate as the MAX over sites: the federation is as private as its most
exposed site. (Flower's default, an example-weighted mean, would understate it.)"""


def dp_costs_reported(update: dict[str, np.ndarray], metrics: dict[str, float], sent: ArrayRecord) -> str:
    """A DP round's update must say what it cost (its epsilon, delta, noise, sample rate and steps)."""
    missing = [k.value for k in DP_REPLY_KEYS if k not in metrics]
    return f"a DP round's update must report {', '.join(missing)}" if missing else ""


def sum_examples(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Train metrics across sites: example-weighted mean loss, total examples, and the max
    epsilon and delta over the sites that report them (site ids dropped)."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(metric_scalar(m[weighting_key])) for m in rows)
    loss = sum(float(metric_scalar(m[MetricKey.LOSS])) * float(metric_scalar(m[weighting_key]))
               for m in rows if MetricKey.LOSS in m)
    out: dict[str, MetricRecordValues] = {MetricKey.LOSS.value: loss / total, "total-examples": total,
                                          "sites": len(records)}
    out.update(max_privacy_metrics(rows))
    return MetricRecord(out)


def max_privacy_metrics(rows: Iterable[dict[str, float] | MetricRecord]) -> dict[str, float]:
    """``epsilon`` and ``delta``: the max over the sites that report them (absent if none does)."""
    out: dict[str, float] = {}
    for key in PRIVACY_MAX_KEYS:
        values = [float(metric_scalar(m[key])) for m in rows if key in m]
        if values:
            out[key.value] = max(values)
    return out


def refusal_reason(content: RecordDict) -> str | None:
    """The reason a site refused the round (its privacy budget, or its data do not fit the run's input), or None
    for an ordinary reply."""
    record = content.config_records.get(RecordKey.REFUSAL.value)
    if record is None or content.array_records:
        return None
    return str(record.get("reason", "refused"))


def weighted_eval_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Evaluation metrics across sites, example-weighted, ignoring ids and NaNs (undefined AUC)."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    out: dict[str, MetricRecordValues] = {}
    keys = {k for m in rows for k, v in m.items()
            if k not in (weighting_key, MetricKey.SITE_ID) and not isinstance(v, list)}
    for key in sorted(keys):
        pairs = [(float(metric_scalar(m[key])), float(metric_scalar(m[weighting_key]))) for m in rows
                 if key in m and np.isfinite(float(metric_scalar(m[key])))]
        if pairs:
            out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    return MetricRecord(out)
