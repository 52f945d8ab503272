"""Server momentum on the aggregated weights: FedAvgM (Hsu, Qi and Brown, "Measuring the effects of non-identical
data distribution for federated visual classification", 2019; Reddi et al., "Adaptive federated optimization",
ICLR 2021, Algorithm 2 with SGD as the server optimiser).

A round's aggregate ``w_bar`` (the mean of the sites' weights, or a robust rule's, or central DP's noisy release)
minus the weights ``w`` the centre sent is a pseudo-gradient step ``delta = w_bar - w``. FedAvg takes it as is.
With server momentum ``beta`` and server learning rate ``eta`` the centre keeps a velocity per shared array:

    v <- beta * v + delta
    w <- w + eta * v

so a direction the sites agree on round after round is followed further than one round's local steps go (with
``beta`` 0.9, up to ten rounds' worth), while directions that flip between rounds cancel. ``eta = 1, beta = 0``
is FedAvg exactly (the arrays are returned unchanged). Only floating-point arrays the round aggregated are moved;
arrays carried over (a frozen encoder, the LoRA base, a site's personal parts) and integer buffers are left as
sent. The step is post-processing of what the aggregation released: it costs no privacy under central or local
DP, and sees nothing SecAgg+ hides (it uses the unmasked mean only).

The velocity is the centre's state: `state` and `load_state` carry it through the round checkpoint, so a resumed
run continues with the velocity it had (same weights as a run that was never interrupted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from medfed.exceptions import ConfigError, FederationError

STATE_PREFIX = "server-momentum/"
"""Prefix of the velocity arrays in a round checkpoint (split from the global weights on resume)."""


@dataclass
class ServerMomentum:
    """The centre's SGD-with-momentum step on each round's aggregate (see the module docstring).

    Args:
        lr: server learning rate ``eta`` (> 0).
        momentum: ``beta`` in [0, 1).
        keys: the arrays the strategy aggregates (the shared ones); others are never moved.
    """

    lr: float
    momentum: float
    keys: Iterable[str]
    velocity: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"server learning rate must be > 0; got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"server momentum must be in [0, 1); got {self.momentum}")
        self.keys = frozenset(self.keys)

    @property
    def is_fedavg(self) -> bool:
        """``eta = 1, beta = 0``: the aggregate is taken as it is."""
        return self.lr == 1 and self.momentum == 0

    def step(self, sent: ArrayRecord, aggregate: ArrayRecord) -> ArrayRecord:
        """The new global weights from the weights sent and the round's aggregate (same keys, same order)."""
        if self.is_fedavg:
            return aggregate
        out = ArrayRecord()
        for key in aggregate.keys():
            new = aggregate[key]
            if key not in self.keys or key not in sent.keys():
                out[key] = new
                continue
            old = sent[key].numpy()
            value = new.numpy()
            if not np.issubdtype(old.dtype, np.floating):  # judged as sent: Flower's mean turns ints into floats
                out[key] = new
                continue
            if value.shape != old.shape:
                raise FederationError(f"server momentum: {key!r} is {value.shape} after aggregation, {old.shape} as "
                                      "sent")
            velocity = self.velocity.get(key)
            delta = value.astype(np.float64) - old.astype(np.float64)
            velocity = delta if velocity is None else self.momentum * velocity + delta
            self.velocity[key] = velocity
            out[key] = Array(np.asarray(old.astype(np.float64) + self.lr * velocity, dtype=old.dtype))
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The velocity, keyed ``STATE_PREFIX + array name`` (for the round checkpoint)."""
        return {STATE_PREFIX + key: torch.from_numpy(np.ascontiguousarray(v)) for key, v in self.velocity.items()}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take the velocity back from a checkpoint's `state` (keys without the prefix are refused)."""
        velocity: dict[str, np.ndarray] = {}
        for name, tensor in state.items():
            if not name.startswith(STATE_PREFIX) or name[len(STATE_PREFIX):] not in self.keys:
                raise FederationError(f"server momentum: the checkpoint's {name!r} is not the velocity of a shared "
                                      "array of this phase")
            velocity[name[len(STATE_PREFIX):]] = tensor.detach().cpu().numpy().astype(np.float64)
        self.velocity = velocity


def load_velocity(step: ServerMomentum | None, velocity: Mapping[str, torch.Tensor]) -> None:
    """Give a resumed phase's server step the velocity its checkpoint holds; a checkpoint with a velocity for a
    phase without a server step is refused (the settings check should have stopped such a resume already)."""
    if not velocity:
        return
    if step is None:
        raise FederationError("the checkpoint holds a server momentum velocity, but this run's pretraining has no "
                              "server step (pretrain-server-lr 1, pretrain-server-momentum 0): not the same run")
    step.load_state(velocity)


def split_momentum_state(weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                         dict[str, torch.Tensor]]:
    """A checkpoint's arrays split into (global weights, server momentum velocity)."""
    model = {k: v for k, v in weights.items() if not k.startswith(STATE_PREFIX)}
    return model, {k: v for k, v in weights.items() if k.startswith(STATE_PREFIX)}


__all__ = ["STATE_PREFIX", "ServerMomentum", "load_velocity", "split_momentum_state"]
