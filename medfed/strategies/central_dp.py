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

With ``fraction-train`` q < 1 this part also samples the sites (`sample`; DP-FedAvg, Algorithm 1): Flower is
asked for every connected site, and each is kept independently with probability q by a CSPRNG
(`medfed.strategies.site_sampling`; which sites a round drew is not reproducible from the seed, by design).
The release is then ``w + (sum of the clipped updates + N(0, (z C)^2)) / (q N)`` (`combine`): the FIXED
expected count q N (N = num-sites), so a sampled site that fails, refuses or is rejected adds zero, an empty
sample releases the noise alone, and one site changes the release by at most C / (q N) whatever the others
do: each release is the Poisson-sampled Gaussian mechanism, recorded at sample rate q. Every update is
clipped by the server in this case, client-clip included (a no-op for an update its site clipped). Such a
round is never failed by min-sites (the strategy's ``min_updates`` is 0): whether a round releases must not
depend on which sites were drawn or how they answered. min-sites still says how many sites must be
connected before a round starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from medfed.config import CentralDPSettings
from medfed.constants import CentralDP, MessageKey, MetricKey, Phase
from medfed.exceptions import FederationError
from medfed.privacy.central import (
    CLIP_TOLERANCE,
    CentralLedger,
    add_noise,
    clip_update,
    clipped_sum,
    noise_std,
    sampled_noise_std,
    update_norm,
)
from medfed.strategies import robust
from medfed.strategies.replies import ReleaseObserver, sum_examples
from medfed.strategies.site_sampling import PoissonSampling

Update = dict[str, np.ndarray]


def train_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The round's train metrics (`medfed.strategies.replies.sum_examples`); ``sites`` 0 for a central-DP round
    with no valid update (an empty Poisson sample, or every sampled site failed or refused)."""
    return sum_examples(records, weighting_key) if records else MetricRecord({"sites": 0})


@dataclass
class CentralDPAggregation:
    """Clip (or check clipping), average unweighted, noise and record one release per round; with ``sampling``,
    DP-FedAvg's Poisson sampling and fixed denominator (the module docstring)."""

    settings: CentralDPSettings
    ledger: CentralLedger
    phase: Phase
    on_release: ReleaseObserver | None = None
    sampling: PoissonSampling | None = None  # fraction-train < 1 (`with_sampling`); None: every site, q = 1
    shared_keys: tuple[str, ...] = ()  # the arrays released under sampling (noised even when no update arrives)
    sampled: dict[int, int] = field(default_factory=dict)  # round -> sites the Poisson draw kept

    def with_sampling(self, num_sites: int, fraction_train: float, shared_keys: list[str]) -> CentralDPAggregation:
        """This part for ``num_sites`` sites at ``fraction_train``: itself at 1 (every site, the mean over the
        updates that arrived, as before); a copy with Poisson sampling at rate q = ``fraction_train`` < 1."""
        if fraction_train >= 1:
            return self
        return replace(self, sampling=PoissonSampling(fraction_train, num_sites), shared_keys=tuple(shared_keys),
                       sampled={})

    def train_config(self) -> dict[str, float]:
        """What a train message adds: the clipping norm a site clips to (client-clip), else nothing."""
        if self.settings.mode == CentralDP.CLIENT_CLIP:
            return {MessageKey.CLIPPING_NORM.value: float(self.settings.clipping_norm)}
        return {}

    def sample(self, server_round: int, messages: Iterable[Message]) -> Iterable[Message]:
        """The train messages of the sites in the round's Poisson sample (all of ``messages`` without sampling:
        Flower's own choice). Flower addressed every connected site; each is kept with probability q."""
        if self.sampling is None:
            return messages
        messages = list(messages)
        kept = set(self.sampling.draw(m.metadata.dst_node_id for m in messages))
        self.sampled[server_round] = len(kept)
        log(INFO, "%s round %s: central DP Poisson sample (CSPRNG): %s of %s connected site(s) at q %.4g (expected "
            "q N = %.4g of %s)", self.phase.value, server_round, len(kept), len(messages), self.sampling.rate,
            self.sampling.expected_sites, self.sampling.num_sites)
        return [m for m in messages if m.metadata.dst_node_id in kept]

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
        """The noised unweighted mean of the (clipped) ``updates``, or under sampling the noised
        ``sent + sum / (q N)`` (``updates`` may be empty); records the release."""
        if self.sampling is not None:
            reference = {key: sent[key].numpy() for key in self.shared_keys}
            total = clipped_sum(updates, reference, self.settings.clipping_norm)  # server clips, whatever the mode
            q_n = self.sampling.expected_sites
            estimate = {key: (np.asarray(ref, np.float64) + total[key] / q_n).astype(ref.dtype)
                        for key, ref in reference.items()}
            return self._noise_and_record(server_round, estimate, sampled_noise_std(self.settings, q_n), len(updates))
        if self.settings.mode == CentralDP.SERVER_CLIP:
            reference = {key: sent[key].numpy() for key in updates[0]}
            updates = [clip_update(u, reference, self.settings.clipping_norm)[0] for u in updates]
        return self.release(server_round, robust.mean(updates), len(updates))

    def release(self, server_round: int, mean: Update, num_updates: int) -> Update:
        """Noise the mean of ``num_updates`` clipped updates (every site asked: q = 1), record the release, report
        its figures. Under Poisson sampling the release is not a mean (`combine`), so this refuses.

        Raises:
            FederationError: called under Poisson sampling (SecAgg+'s unmasked mean; the config refuses secagg+
                with central DP at fraction-train < 1).
        """
        if self.sampling is not None:
            raise FederationError("central DP with Poisson site sampling releases sum / (q N), not the mean of the "
                                  "updates that arrived; secure-aggregation secagg+ needs fraction-train 1")
        return self._noise_and_record(server_round, mean, noise_std(self.settings, num_updates), num_updates)

    def _noise_and_record(self, server_round: int, estimate: Update, std: float, contributing: int) -> Update:
        """Noise ``estimate`` (std ``std`` per coordinate, CSPRNG), record the release at the round's sample rate,
        report its figures (``sites``: the updates in it; under sampling also the sites drawn and q N)."""
        s, sampling = self.settings, self.sampling
        rate = 1.0 if sampling is None else sampling.rate
        noisy = add_noise(estimate, std)
        epsilon = self.ledger.record(self.phase.value, server_round, rate)
        figures = {MetricKey.CENTRAL_EPSILON.value: epsilon, MetricKey.DELTA.value: s.delta,
                   MetricKey.NOISE_MULTIPLIER.value: s.noise_multiplier, MetricKey.CLIPPING_NORM.value: s.clipping_norm,
                   MetricKey.NOISE_STD.value: std, "sites": float(contributing), MetricKey.SAMPLE_RATE.value: rate}
        if sampling is None:
            log(INFO, "%s round %s: central DP noise (std %.3g = z %.3g x C %.3g / %s sites); site-level epsilon "
                "%.4g at delta %.3g", self.phase.value, server_round, std, s.noise_multiplier, s.clipping_norm,
                contributing, epsilon, s.delta)
        else:
            drawn = self.sampled.get(server_round, contributing)
            figures |= {"sampled-sites": float(drawn), "expected-sites": sampling.expected_sites}
            log(INFO, "%s round %s: central DP noise (std %.3g = z %.3g x C %.3g / q N %.4g); %s of the %s site(s) "
                "sampled contributed (the others add zero); site-level epsilon %.4g at delta %.3g, sample rate %.4g",
                self.phase.value, server_round, std, s.noise_multiplier, s.clipping_norm, sampling.expected_sites,
                contributing, drawn, epsilon, s.delta, sampling.rate)
        if self.on_release is not None:
            self.on_release(server_round, figures)
        return noisy
