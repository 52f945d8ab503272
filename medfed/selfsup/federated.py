"""How a site takes the global self-supervised state into its next pretraining round, Flower-free.

The server averages what the sites send, as FedAvg does; what differs between the options of
``ssl-aggregation`` is what a site starts its round from:

* fedavg: the global encoder, replacing its own.
* fedema (Zhuang et al., "Divergence-aware Federated Self-Supervised Learning", ICLR 2022): an exponential
  moving average of the site's own encoder of its last round W_k and the global one W_g,
  ``W = mu W_k + (1 - mu) W_g`` with ``mu = min(lambda ||W_g - W_k||, 1)``: a site whose encoder drifted far
  from the global one keeps more of its own (local knowledge under non-IID data). ``lambda`` is set once per
  site by the autoscaler, ``lambda = tau / ||W_g - W_k||`` at its first divergence, so that first ``mu`` is tau.
* fedu (Zhuang et al., "Collaborative Unsupervised Visual Representation Learning from Decentralized Data",
  ICCV 2021): the global encoder, and BYOL's predictor is shared too; a site takes the global predictor only
  while its own encoder is near the global one (divergence-aware predictor update: relative divergence
  ``||W_g - W_k|| / ||W_g||`` below ``fedu-threshold``), else it keeps its own.

Momentum targets, projectors and decoders stay at the site under every option (as do predictors, except under
fedu). What a site keeps for the next round travels in its site-local state under `KEPT_PREFIX` (never sent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medfed.constants import MetricKey, SSLAggregation
from medfed.exceptions import ConfigError

StateDict = dict[str, torch.Tensor]

PREDICTOR_PREFIX = "ssl-predictor."
"""Under fedu, the global arrays of pretraining hold BYOL's predictor under this prefix beside the encoder."""
KEPT_PREFIX = "kept/"
"""Site-local state that is not a module's: the site's own last encoder, FedEMA's lambda, personal parts."""
OWN_ENCODER = KEPT_PREFIX + "encoder/"
OWN_NORMS = KEPT_PREFIX + "norm/"
EMA_SCALE = KEPT_PREFIX + "fedema-lambda"


SAME = 1e-9
"""A relative divergence at or below this is the site's own encoder come back (FedEMA's autoscaler waits)."""


def split_prefixed(state: StateDict, prefix: str) -> tuple[StateDict, StateDict]:
    """(entries without ``prefix``, entries with it, the prefix removed)."""
    plain = {k: v for k, v in state.items() if not k.startswith(prefix)}
    prefixed = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return plain, prefixed


def l2_distance(a: StateDict, b: StateDict) -> float:
    """Euclidean distance between two states over their floating-point tensors (same keys)."""
    total = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point())
    return math.sqrt(total)


def l2_norm(a: StateDict) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in a.values() if v.is_floating_point()))


@dataclass(frozen=True)
class RoundStart:
    """What a site starts a pretraining round from, and the figures it reports about it."""

    encoder: StateDict
    take_global_predictor: bool
    kept: StateDict  # the site's kept entries (`KEPT_PREFIX`), the EMA scale updated
    metrics: dict[str, float]


def start_round(aggregation: SSLAggregation | str, global_encoder: StateDict, kept: StateDict, *,
                tau: float, fedu_threshold: float) -> RoundStart:
    """The encoder a site trains from this round, whether it takes the global predictor (fedu), and figures.

    Args:
        aggregation: the run's ``ssl-aggregation``.
        global_encoder: the encoder the server sent (its state dict).
        kept: the site's kept entries from its last round (empty at its first): its own encoder under
            `OWN_ENCODER`, FedEMA's lambda under `EMA_SCALE`.
        tau: FedEMA's autoscaler (the first mu).
        fedu_threshold: FedU's threshold on the relative divergence.
    """
    how = SSLAggregation(aggregation)
    _, own = split_prefixed(kept, OWN_ENCODER)
    if how == SSLAggregation.FEDAVG or not own:  # first round at this site: nothing of its own to keep
        return RoundStart(dict(global_encoder), True, dict(kept), {})
    check_like(global_encoder, own)
    distance, norm = l2_distance(global_encoder, own), l2_norm(global_encoder)
    relative = distance / norm
    metrics = {MetricKey.SSL_DIVERGENCE.value: relative}
    if how == SSLAggregation.FEDU:
        take = relative < fedu_threshold
        metrics[MetricKey.PREDICTOR_TAKEN.value] = float(take)
        return RoundStart(dict(global_encoder), take, dict(kept), metrics)
    new_kept = dict(kept)
    if EMA_SCALE in kept:
        scale = float(kept[EMA_SCALE])
    elif relative > SAME:  # the autoscaler: this first divergence gives mu = tau
        scale = tau / distance
        new_kept[EMA_SCALE] = torch.tensor(scale, dtype=torch.float64)
    else:  # the global encoder is the site's own (it alone was sampled): nothing to scale by yet
        scale = 0.0
    mu = min(scale * distance, 1.0)
    merged = {k: (mu * own[k] + (1 - mu) * v).to(v.dtype) if v.is_floating_point() else v.clone()
              for k, v in global_encoder.items()}
    return RoundStart(merged, True, new_kept, {**metrics, MetricKey.EMA_DECAY.value: mu})


def check_like(incoming: StateDict, own: StateDict) -> None:
    """Raise `ConfigError` unless the global encoder the server sent has the site's own encoder's keys, shapes and
    dtypes, finite values and a non-zero norm (checked before any arithmetic mixes them).

    Raises:
        ConfigError: naming the first array at fault (model keys only).
    """
    if set(incoming) != set(own):
        raise ConfigError(f"the global encoder the server sent has other arrays than this site's: unexpected "
                          f"{sorted(set(incoming) - set(own))[:3]}, missing {sorted(set(own) - set(incoming))[:3]}")
    for key, value in incoming.items():
        if tuple(value.shape) != tuple(own[key].shape) or value.dtype != own[key].dtype:
            raise ConfigError(f"the global encoder's {key!r} is {value.dtype}{tuple(value.shape)}; this site's is "
                              f"{own[key].dtype}{tuple(own[key].shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ConfigError(f"the global encoder's {key!r} holds NaN or infinite values")
    if not l2_norm(incoming) > 0:
        raise ConfigError("the global encoder the server sent is all zeros")


def rekeep(local: StateDict, shared: StateDict) -> StateDict:
    """The site-local state with its kept copies of shared weights (own encoder, own norms) replaced by what was
    actually sent (central DP's client-side clipping changes the release after training): a site never keeps, as
    'its own', weights it did not release."""
    out = dict(local)
    for prefix in (OWN_ENCODER, OWN_NORMS):
        for key in [k for k in out if k.startswith(prefix)]:
            if key[len(prefix):] in shared:
                out[key] = shared[key[len(prefix):]].detach().cpu().clone()
    return out


def keep_after_round(aggregation: SSLAggregation | str, encoder: StateDict, kept: StateDict) -> StateDict:
    """The kept entries for the next round: the encoder this round ended with (fedema, fedu), the rest as kept."""
    rest, _ = split_prefixed(kept, OWN_ENCODER)
    if SSLAggregation(aggregation) == SSLAggregation.FEDAVG:
        return rest
    return {**rest, **{OWN_ENCODER + k: v.detach().cpu().clone() for k, v in encoder.items()}}


def shared_predictor(method: torch.nn.Module) -> torch.nn.Module:
    """BYOL's predictor inside ``method`` (BYOL itself, or a `Combined` holding BYOL): what fedu shares.

    Raises:
        ValueError: the method holds no BYOL (the settings check refuses fedu without byol first).
    """
    from medfed.selfsup.methods import BYOL, Combined

    parts = list(method.parts) if isinstance(method, Combined) else [method]
    for part in parts:
        if isinstance(part, BYOL):
            return part.predictor
    raise ValueError("ssl-aggregation fedu needs BYOL among the self-supervised methods")
