"""The site's side of a SecAgg+ round (Flower's legacy message layout), beside the ClientApp's plain path.

Flower 1.41-1.42 runs SecAgg+ only through its legacy workflow: the train message arrives as ``fitins.*``
with unnamed arrays, and the reply is a ``fitres`` whose parameters `secaggplus_mod` masks. The round's
work is the same `medfed.task.site_round.train_site` as a plain round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from medfed.constants import SECAGG_REFUSAL_METRIC, SECAGG_SENT_KEYS, SECAGG_SHARED_KEYS
from medfed.exceptions import DataError
from medfed.task.site_round import TrainOutcome, read_message_config

LEGACY_FITINS_CONFIG, LEGACY_FITINS_PARAMETERS = "fitins.config", "fitins.parameters"
SiteTrain = Callable[[ConfigRecord, dict[str, torch.Tensor], Context], TrainOutcome]


def is_secagg_round(msg: Message) -> bool:
    """True for the train message of a SecAgg+ round (Flower's legacy layout)."""
    return LEGACY_FITINS_CONFIG in msg.content.config_records


def secagg_when_asked(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round (they carry its stage record); every
    other train message goes straight to the handler (the mod would reject it)."""
    if SECAGG_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def train_secagg(msg: Message, context: Context, site_train: SiteTrain) -> Message:
    """The handler's side of a SecAgg+ round: Flower's legacy layout in (``fitins.*``, arrays unnamed), a
    ``fitres`` out whose parameters ``secaggplus_mod`` masks. Weight 1, or 0 for a refusal (zeros of the right
    shapes, so the secure sum still adds up; the reason travels in the clear metrics)."""
    config = msg.content.config_records[LEGACY_FITINS_CONFIG]
    sent_keys, shared_keys = str(config[SECAGG_SENT_KEYS]).split("\n"), str(config[SECAGG_SHARED_KEYS]).split("\n")
    values = list(msg.content.array_records[LEGACY_FITINS_PARAMETERS].values())
    if len(values) != len(sent_keys):
        raise DataError(f"SecAgg+ round: {len(values)} arrays arrived for {len(sent_keys)} names")
    incoming = {k: torch.from_numpy(np.array(v.numpy())) for k, v in zip(sent_keys, values, strict=True)}
    own = ConfigRecord({k: v for k, v in config.items() if k not in (SECAGG_SENT_KEYS, SECAGG_SHARED_KEYS)})
    outcome = site_train(own, incoming, context)
    metrics: dict[str, Any] = dict(outcome.metrics)
    if outcome.shared is None:
        arrays, weight = [np.zeros_like(incoming[k].numpy()) for k in shared_keys], 0
        metrics[SECAGG_REFUSAL_METRIC] = outcome.refusal
    else:
        if sorted(outcome.shared) != sorted(shared_keys):
            raise DataError("SecAgg+ round: this site's shared weights differ from the arrays the server sums")
        arrays, weight = [outcome.shared[k].detach().cpu().numpy() for k in shared_keys], 1
        limit = read_message_config(own)[0].secagg.clipping_range
        peak = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
        if peak > limit:
            raise DataError(f"SecAgg+ round: a shared weight of magnitude {peak:.4g} lies outside the quantisation "
                            f"range [-{limit:g}, {limit:g}] (secagg-clipping-range); raise it rather than have the "
                            "sum clipped")
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), weight, metrics)
    return Message(content=fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
