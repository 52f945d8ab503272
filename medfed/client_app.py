"""The ClientApp: translates Flower messages to and from the site's round, nothing more.

Each train message carries the run settings (flat kebab-case), the phase and the global weights. The
reply carries only the shared weights (an ArrayRecord) and scalar metrics (a MetricRecord), or a
refusal with its reason; the site-local SSL state (heads, predictors, decoders, momentum targets) and its
own copy of its personal parts (``personal``) are kept in ``context.state``. What a round does is
`medfed.task.site_round` (Flower-free).

Where a site's data come from is the only thing that differs between simulation and deployment: a
node config with ``data-path`` names the site's own file; otherwise ``partition-id`` picks the site's
share of the partition written to the run directory.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.typing import MetricRecordValues
from flwr.clientapp import ClientApp

from medfed.client.redaction import redacted_errors_mod
from medfed.client.secagg import is_secagg_round, secagg_when_asked, train_secagg
from medfed.constants import RecordKey
from medfed.fl.packing import packed_transport_mod
from medfed.task.site_round import TrainOutcome, evaluate_site, train_site

REFUSAL_REASON = "reason"

# outermost first: errors reach the server redacted (medfed.client.redaction); arrays are unpacked from what a
# deployment's ServerApp packed (medfed.fl.packing)
app = ClientApp(mods=[redacted_errors_mod, packed_transport_mod])


def site_train(config: ConfigRecord, incoming: dict, context: Context) -> TrainOutcome:
    """`train_site` with the node's config and its SSL state kept in ``context.state`` between rounds."""
    outcome = train_site(config, incoming, dict(context.node_config), _kept(context, RecordKey.SITE_LOCAL),
                         _kept(context, RecordKey.SITE_PERSONAL))
    if outcome.local_state is not None:
        context.state[RecordKey.SITE_LOCAL.value] = ArrayRecord(outcome.local_state)
    if outcome.personal_state is not None:
        context.state[RecordKey.SITE_PERSONAL.value] = ArrayRecord(outcome.personal_state)
    return outcome


def _kept(context: Context, key: RecordKey) -> dict | None:
    """What this site kept in its node state under ``key`` (None before its first round)."""
    record = context.state.array_records.get(key.value)
    return record.to_torch_state_dict() if record is not None else None


def _reply(msg: Message, arrays: ArrayRecord | None, metrics: Mapping[str, MetricRecordValues]) -> Message:
    content = RecordDict({RecordKey.METRICS.value: MetricRecord(dict(metrics))})
    if arrays is not None:
        content[RecordKey.ARRAYS.value] = arrays
    return Message(content=content, reply_to=msg)


@app.train(mods=[secagg_when_asked])
def train(msg: Message, context: Context) -> Message:
    if is_secagg_round(msg):
        return train_secagg(msg, context, site_train)
    incoming = msg.content.array_records[RecordKey.ARRAYS.value].to_torch_state_dict()
    outcome = site_train(msg.content.config_records[RecordKey.CONFIG.value], incoming, context)
    if outcome.shared is None:
        content = RecordDict({RecordKey.METRICS.value: MetricRecord(dict(outcome.metrics)),
                              RecordKey.REFUSAL.value: ConfigRecord({REFUSAL_REASON: outcome.refusal})})
        return Message(content=content, reply_to=msg)
    return _reply(msg, ArrayRecord(outcome.shared), outcome.metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on this site's validation data."""
    state = msg.content.array_records[RecordKey.ARRAYS.value].to_torch_state_dict()
    config = msg.content.config_records[RecordKey.CONFIG.value]
    return _reply(msg, None, evaluate_site(config, state, context.node_config,
                                           _kept(context, RecordKey.SITE_PERSONAL)))
