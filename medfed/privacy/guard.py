"""A site's privacy guard: budget, ledger, projection and refusal, round by round.

Before a DP round the guard opens the site's ledger (verifying every row's chain and
signature), rebuilds the accountant from the ledger's whole history (all earlier rounds and
runs: a fresh Opacus PrivacyEngine per round would only know the current round), plans the
noise multiplier if it was not given, and projects the epsilon after the round. If that
would pass the site's budget the round is refused (`PrivacyBudgetExceeded`) and nothing is
written. After the round it appends one signed row. Weights that leave the site from a
non-DP phase (in a DP run, or in a run without DP at all) are appended as ``mechanism = none``
rows: exposure no epsilon covers. Every row records the site's budget in force.

The ledger is opened with its anchor (beside the signing key): a site whose key has already
signed releases refuses to start again from a missing, shorter or different ledger.

The site's budget is its own: in a deployment the node config's ``dp-epsilon``/``dp-delta``
set it and the run config (which comes from the server) can only lower it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from medfed.config import RunConfig
from medfed.constants import NodeConfigKey, Phase
from medfed.exceptions import ConfigError, LedgerError, PrivacyBudgetExceeded
from medfed.privacy.accounting import (
    DEFAULT_MAX_PLANNED_NOISE,
    MechanismStep,
    check_accountant,
    check_budget,
    epsilon_spent,
    plan_run_noise,
    project_epsilon,
    run_target_epsilon,
)
from medfed.privacy.ledger import (
    MECHANISM_DP_SGD,
    MECHANISM_NONE,
    Ledger,
    LedgerEntry,
    Release,
    anchor_path_for_key,
    check_ledger_not_reset,
    load_or_create_signing_key,
)

LEDGER_SUFFIX = ".ledger.sqlite"
KEY_SUFFIX = ".ed25519.pem"


@dataclass(frozen=True)
class SitePrivacy:
    """One site's resolved privacy settings and where its ledger and key live."""

    site: str
    epsilon: float
    delta: float
    accountant: str
    max_grad_norm: float
    noise_multiplier: float  # 0: plan
    grad_sample_mode: str
    secure_rng: bool
    ledger_path: Path
    key_path: Path
    run_epsilon: float = 0.0  # this run's share: cumulative epsilon may rise this much during it (0: all left)
    max_planned_noise: float = DEFAULT_MAX_PLANNED_NOISE  # a planned sigma above this refuses the round

    @classmethod
    def resolve(cls, cfg: RunConfig, site: str, node_config: Mapping[str, object],
                default_ledger_dir: Path | None) -> SitePrivacy:
        """Run settings, overridden by the site's node config (ledger path, key, a lower budget).
        ``default_ledger_dir`` holds the ledger when the node config names none (simulation)."""
        epsilon, delta = cfg.privacy.epsilon, cfg.privacy.delta
        if NodeConfigKey.DP_EPSILON in node_config:
            epsilon = min(epsilon, _number(node_config, NodeConfigKey.DP_EPSILON))
        if NodeConfigKey.DP_DELTA in node_config:
            delta = min(delta, _number(node_config, NodeConfigKey.DP_DELTA))
        check_budget(epsilon, delta)
        if NodeConfigKey.LEDGER_PATH in node_config:
            ledger = Path(str(node_config[NodeConfigKey.LEDGER_PATH]))
        elif default_ledger_dir is not None:
            ledger = default_ledger_dir / f"site-{site}{LEDGER_SUFFIX}"
        else:
            raise ConfigError(f"site {site}: no ledger-path in its node config and no default ledger folder")
        default_key = ledger.with_name(ledger.name.removesuffix(LEDGER_SUFFIX) + KEY_SUFFIX)
        key = Path(str(node_config.get(NodeConfigKey.SIGNING_KEY, default_key)))
        return cls(
            site=site, epsilon=epsilon, delta=delta, accountant=check_accountant(cfg.privacy.accountant),
            max_grad_norm=cfg.privacy.max_grad_norm, noise_multiplier=cfg.privacy.noise_multiplier,
            grad_sample_mode=cfg.privacy.grad_sample_mode, secure_rng=cfg.privacy.secure_rng,
            ledger_path=ledger.expanduser(), key_path=key.expanduser(),
            run_epsilon=cfg.privacy.run_epsilon, max_planned_noise=cfg.privacy.max_planned_noise,
        )


def _number(node_config: Mapping[str, object], key: str) -> float:
    try:
        return float(node_config[key])  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"node config {key!r} must be a number; got {node_config[key]!r}") from exc


@dataclass(frozen=True)
class RoundPlan:
    """The mechanism a DP round will run and what the site will have spent after it."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    spent_before: float
    projected: float
    ledger_rows: int = 0  # rows the projection was made from: recording checks nothing was added since


def open_signed_ledger(ledger_path: Path, key_path: Path, site: str) -> Ledger:
    """Open (or create) a ledger signed with the Ed25519 key at ``key_path`` (created if missing), anchored by the
    file beside the key (`anchor_path_for_key`): a key that already signed releases refuses a missing, shorter or
    different ledger. A key named ``*.ed25519.pem`` gets its public half written beside it as ``*.pub`` (what
    `medfed audit --trusted-keys` reads)."""
    key = load_or_create_signing_key(key_path)
    public = key_path.with_name(key_path.name.removesuffix(KEY_SUFFIX) + ".pub")
    if key_path.name.endswith(KEY_SUFFIX) and not public.exists():
        public.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return Ledger.open(ledger_path, key, site, anchor=anchor_path_for_key(key_path))


class PrivacyGuard:
    """Projects, refuses and records one site's DP rounds against its ledger."""

    def __init__(self, privacy: SitePrivacy, run_id: str) -> None:
        self.privacy, self.run_id = privacy, run_id

    def _open(self) -> Ledger:
        return open_signed_ledger(self.privacy.ledger_path, self.privacy.key_path, self.privacy.site)

    def _check_missing_ledger(self) -> None:
        """No ledger file yet: fine for a new site, a LedgerResetError if its key's anchor records releases
        (the ledger was deleted; planning from an empty history would reset the budget)."""
        p = self.privacy
        if anchor_path_for_key(p.key_path).exists():
            check_ledger_not_reset(p.ledger_path, load_or_create_signing_key(p.key_path), p.site,
                                   anchor_path_for_key(p.key_path))

    def secret_seed(self, *parts: object) -> int:
        """A 63-bit seed only this site can derive: HMAC-SHA256 keyed by its private signing key
        over the run id and ``parts`` (reproducible at the site, unpredictable to the server)."""
        key = load_or_create_signing_key(self.privacy.key_path)
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        digest = hmac.new(raw, repr((self.run_id, self.privacy.site, *parts)).encode(), hashlib.sha256).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    def history(self) -> list[MechanismStep]:
        """Every DP release in the ledger, in order (all rounds, all runs)."""
        if not self.privacy.ledger_path.exists():
            self._check_missing_ledger()
            return []
        with self._open() as ledger:
            return release_history(ledger.entries())

    def spent(self) -> float:
        return epsilon_spent(self.history(), self.privacy.delta, self.privacy.accountant)

    def check_site_size(self, n: int) -> None:
        check_budget(self.privacy.epsilon, self.privacy.delta, site_size=n)

    def plan(self, sample_rate: float, steps: int, later: Sequence[tuple[float, int]]) -> RoundPlan:
        """The round's noise multiplier (given, or planned so this round plus ``later`` rounds spend this run's
        share: ``run_epsilon`` more than the site had spent when the run began, or all that is left when it is 0)
        and its projected epsilon; refuses past the budget or the run's share, and a planned sigma above
        ``max_planned_noise`` (`medfed.privacy.accounting.plan_run_noise`)."""
        p = self.privacy
        rows = 0
        history: list[MechanismStep] = []
        earlier: list[MechanismStep] = []  # the releases before this run's first
        if p.ledger_path.exists():
            with self._open() as ledger:
                entries = ledger.entries()
            rows, history = len(entries), release_history(entries)
            earlier = release_history(entries_before_run(entries, self.run_id))
        else:
            self._check_missing_ledger()
        spent = epsilon_spent(history, p.delta, p.accountant)
        if spent >= p.epsilon:
            raise PrivacyBudgetExceeded(
                f"site {p.site} has spent its budget: epsilon {spent:.4g} of {p.epsilon:g} (delta {p.delta:g})"
            )
        before_run = epsilon_spent(earlier, p.delta, p.accountant) if p.run_epsilon > 0 else 0.0
        target = run_target_epsilon(p.epsilon, before_run, p.run_epsilon)
        sigma = p.noise_multiplier
        if sigma <= 0:
            sigma = plan_run_noise(history, [(sample_rate, steps), *later], lifetime=p.epsilon, delta=p.delta,
                                   accountant=p.accountant, spent_before_run=before_run, run_epsilon=p.run_epsilon,
                                   max_planned_noise=p.max_planned_noise, site=p.site)
        step = MechanismStep(sigma, sample_rate, steps)
        projected = project_epsilon(history, step, p.delta, p.accountant)
        if projected > p.epsilon:
            raise PrivacyBudgetExceeded(
                f"site {p.site} refuses the round: epsilon would reach {projected:.4g} > budget {p.epsilon:g} "
                f"(spent {spent:.4g}; sigma {sigma:.3g}, q {sample_rate:.3g}, {steps} steps)"
            )
        if projected > target:
            raise PrivacyBudgetExceeded(
                f"site {p.site} refuses the round: epsilon would reach {projected:.4g} > {target:.4g}, "
                f"this run's share "
                f"(dp-run-epsilon {p.run_epsilon:g} from {before_run:.4g} when the run began; sigma {sigma:.3g}, "
                f"q {sample_rate:.3g}, {steps} steps)"
            )
        return RoundPlan(sigma, sample_rate, steps, spent, projected, rows)

    def record_dp(self, plan: RoundPlan, phase: Phase, server_round: int) -> LedgerEntry:
        """Append the executed round; the epsilon after is recomputed from the ledger it extends."""
        p = self.privacy
        with self._open() as ledger:
            entries = ledger.entries()
            if len(entries) != plan.ledger_rows:
                raise LedgerError(
                    f"{p.ledger_path}: {len(entries) - plan.ledger_rows} release(s) were recorded since this round was "
                    "planned (another run at this site?); the round's weights are not released"
                )
            history = release_history(entries)
            step = MechanismStep(plan.noise_multiplier, plan.sample_rate, plan.steps)
            after = project_epsilon(history, step, p.delta, p.accountant)
            if after > p.epsilon:
                raise PrivacyBudgetExceeded(
                    f"site {p.site}: epsilon after the round would be {after:.4g} > budget {p.epsilon:g}; not released"
                )
            after = max(after, _floor(entries, p.delta, p.accountant))
            return ledger.append(Release(
                run_id=self.run_id, server_round=server_round, phase=phase.value, mechanism=MECHANISM_DP_SGD,
                sample_rate=plan.sample_rate, noise_multiplier=plan.noise_multiplier, steps=plan.steps,
                delta=p.delta, epsilon_after=after, accountant=p.accountant, epsilon_budget=p.epsilon,
            ))

    def record_uncovered(self, phase: Phase, server_round: int) -> LedgerEntry:
        """Weights leave the site from a non-DP phase (of a DP run, or of a run without DP): an exposure row that
        no epsilon covers; its ``epsilon_after`` repeats the DP epsilon so far, unchanged."""
        p = self.privacy
        with self._open() as ledger:
            entries = ledger.entries()
            spent = max(epsilon_spent(release_history(entries), p.delta, p.accountant),
                        _floor(entries, p.delta, p.accountant))
            return ledger.append(Release(
                run_id=self.run_id, server_round=server_round, phase=phase.value, mechanism=MECHANISM_NONE,
                sample_rate=0.0, noise_multiplier=0.0, steps=0, delta=p.delta, epsilon_after=spent,
                accountant=p.accountant, epsilon_budget=p.epsilon,
            ))


def _floor(entries: Sequence[LedgerEntry], delta: float, accountant: str) -> float:
    """The last recorded epsilon with the same delta and accountant: cumulative epsilon must not go
    down, and PRV's numerics can move the last digits down when a very noisy round is added (the
    larger value is still a valid upper bound)."""
    same = [e.epsilon_after for e in entries if e.delta == delta and e.accountant == accountant]
    return same[-1] if same else 0.0


def entries_before_run(entries: Sequence[LedgerEntry], run_id: str) -> list[LedgerEntry]:
    """The rows written before run ``run_id``'s first (all of them while it has none): what the site had spent
    when the run began, which its share (``dp-run-epsilon``) is counted from; a resumed run keeps its run id."""
    first = next((i for i, e in enumerate(entries) if e.run_id == run_id), len(entries))
    return list(entries[:first])


def release_history(entries: Sequence[LedgerEntry], mechanism: str = MECHANISM_DP_SGD) -> list[MechanismStep]:
    """The releases of ``mechanism`` in a ledger, in order, as the accountant composes them."""
    return [MechanismStep(e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.mechanism == mechanism]
