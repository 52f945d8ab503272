"""Central (site-level) DP as a part of the shared-weights strategy: DP-FedAvg (McMahan et al., ICLR 2018).

What it adds to a round: with ``client-clip`` each train message carries Flower's ``clipping_norm`` key
(each site clips its own update to it) and the server rejects an update above it; with ``server-clip``
the server clips each accepted update. Then the unweighted mean of the n clipped updates, Gaussian noise
of std ``z C / n`` on every shared coordinate (CSPRNG), and one signed row in the server's central ledger
(`medfed.privacy.central.CentralLedger`) per release.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping`` / ``...ClientSideFixedClipping``
(``flwr.serverapp.strategy``, read in the installed flwr source, 1.41.0 and 1.42.0 alike):

- server-side clipping zips each reply's arrays with ALL the arrays sent, by position (``strict=True``):
  it raises when a phase shares only some arrays (LoRA adapters plus head; a linear probe's head), and
  it clips before the reply contract is checked, so a malformed update crashes the round instead of
  being rejected with a reason; one error reply drops the whole round;
- the noise goes onto every aggregated array, including frozen weights a phase carries over unchanged
  (the LoRA base model), which would be damaged and not made more private;
- the noise std is ``z C / num_sampled_clients`` whatever the number of updates that arrived, so a round
  with a dropped or refusing site is under-noised;
- the inner aggregation is FedAvg's example-weighted mean, whose sensitivity is ``C max_i w_i / sum_i w_i``,
  not ``C / n`` (Flower's own accountant refuses unequal weights for this reason).

So the clipping, the mean and the noise run here, after the strategy's reply checks, over the shared
arrays only; the message key is Flower's, so a site sees the same ``clipping_norm`` it would from Flower.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord
from flwr.common.logger import log

from medfed.config import CentralDPSettings
from medfed.constants import CentralDP, MessageKey, MetricKey, Phase
from medfed.privacy.central import CLIP_TOLERANCE, CentralLedger, add_noise, clip_update, noise_std, update_norm
from medfed.strategies import robust
from medfed.strategies.replies import ReleaseObserver

Update = dict[str, np.ndarray]


@dataclass
class CentralDPAggregation:
    """Clip (or check clipping), average unweighted, noise and record one release per round."""

    settings: CentralDPSettings
    ledger: CentralLedger
    phase: Phase
    on_release: ReleaseObserver | None = None

    def train_config(self) -> dict[str, float]:
        """What a train message adds: the clipping norm a site clips to (client-clip), else nothing."""
        if self.settings.mode == CentralDP.CLIENT_CLIP:
            return {MessageKey.CLIPPING_NORM.value: float(self.settings.clipping_norm)}
        return {}

    def check(self, update: Update, metrics: dict[str, float], sent: ArrayRecord) -> str:
        """Why a site-clipped update is refused (its norm is above the clipping norm), or '' (a `ReplyCheck`)."""
        if self.settings.mode != CentralDP.CLIENT_CLIP:
            return ""
        norm = update_norm(update, {k: sent[k].numpy() for k in update})
        if norm > self.settings.clipping_norm * (1 + CLIP_TOLERANCE):
            return (f"update norm {norm:.4g} is above the central-dp clipping norm "
                    f"{self.settings.clipping_norm:g}: the site did not clip (client-clip)")
        return ""

    def combine(self, server_round: int, updates: list[Update], sent: ArrayRecord) -> Update:
        """The noised unweighted mean of the (clipped) ``updates``; records the release."""
        if self.settings.mode == CentralDP.SERVER_CLIP:
            reference = {key: sent[key].numpy() for key in updates[0]}
            updates = [clip_update(u, reference, self.settings.clipping_norm)[0] for u in updates]
        return self.release(server_round, robust.mean(updates), len(updates))

    def release(self, server_round: int, mean: Update, num_updates: int) -> Update:
        """Noise the mean of ``num_updates`` clipped updates, record the release, report its figures."""
        s = self.settings
        std = noise_std(s, num_updates)
        noisy = add_noise(mean, std)
        epsilon = self.ledger.record(self.phase.value, server_round)
        log(INFO, "%s round %s: central DP noise (std %.3g = z %.3g x C %.3g / %s sites); site-level epsilon "
            "%.4g at delta %.3g", self.phase.value, server_round, std, s.noise_multiplier, s.clipping_norm,
            num_updates, epsilon, s.delta)
        if self.on_release is not None:
            self.on_release(server_round, {
                MetricKey.CENTRAL_EPSILON.value: epsilon, MetricKey.DELTA.value: s.delta,
                MetricKey.NOISE_MULTIPLIER.value: s.noise_multiplier, MetricKey.CLIPPING_NORM.value: s.clipping_norm,
                MetricKey.NOISE_STD.value: std, "sites": float(num_updates),
            })
        return noisy
