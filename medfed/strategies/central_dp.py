"""Central (site-level) DP through Flower's DP strategy wrappers, fitted to medfed's shared-weights strategies.

medfed wraps its strategy in Flower 1.41's ``DifferentialPrivacyServerSideFixedClipping`` or
``DifferentialPrivacyClientSideFixedClipping`` (``flwr.serverapp.strategy``): their configure step is
Flower's own (the client-side wrapper puts Flower's ``clipping_norm`` key into every train message;
the server-side one remembers the arrays it sent). Their aggregate step is replaced, because as shipped
it cannot serve medfed's phases correctly (read in the installed flwr 1.41.0 source):

- server-side clipping zips each reply's arrays with ALL the arrays sent, by position (``strict=True``):
  it raises when a phase shares only some arrays (LoRA adapters plus head; a linear probe's head), and it
  clips before the reply contract is checked, so a malformed update crashes the round instead of being
  rejected with a reason;
- the noise goes onto every aggregated array, including frozen weights a phase carries over unchanged
  (the LoRA base model), which would be damaged and not made more private;
- the noise std is ``z C / num_sampled_clients`` whatever the number of updates that arrived, so a round
  with a dropped or refusing site is under-noised; and one error reply drops the whole round;
- aggregation is FedAvg's example-weighted mean, whose sensitivity is ``C max_i w_i / sum_i w_i``, not
  ``C / n`` (Flower's own accountant refuses unequal weights for this reason).

So aggregation runs inside the wrapped `SharedWeightsMixin` (`enable_central_dp`): contract check,
client-clip norm check, clipping by key over the shared arrays only, unweighted mean, noise of std
``z C / n`` for the n updates actually averaged, one signed row in the server's central ledger
(`medfed.privacy.central.CentralLedger`) per release.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from medfed.constants import CentralDP
from medfed.privacy.central import CentralDPSettings, CentralLedger
from medfed.strategies.shared_weights import ReleaseObserver, SharedWeightsMixin


class SiteLevelServerSideClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping wrapper; the server clips each update over the shared arrays."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)


class SiteLevelClientSideClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping wrapper; each site clips to the ``clipping_norm`` it is sent and the
    server rejects an update above it (unless SecAgg+ hides it)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)


def wrap_central_dp(strategy: SharedWeightsMixin, settings: CentralDPSettings, ledger: CentralLedger,
                    on_release: ReleaseObserver | None = None) -> SiteLevelServerSideClipping | SiteLevelClientSideClipping:
    """``strategy`` with central DP on, wrapped in the Flower wrapper for ``settings.mode``."""
    strategy.enable_central_dp(settings, ledger, on_release)
    sampled = max(1, int(strategy.min_train_nodes))  # type: ignore[attr-defined]  # Flower's bookkeeping only
    wrapper = SiteLevelServerSideClipping if settings.mode == CentralDP.SERVER_CLIP else SiteLevelClientSideClipping
    return wrapper(strategy, settings.noise_multiplier, settings.clipping_norm, sampled)  # type: ignore[arg-type]
