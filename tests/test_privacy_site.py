"""A site under DP without Flower: cumulative accounting from the ledger, planning, refusal,
restart round trip, uncovered exposure, LoRA structure and its privacy-safe shared keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medfed.config import RunConfig, run_config
from medfed.constants import MetricKey, Phase, TaskType
from medfed.data.medmnist import load_medmnist
from medfed.data.site import site_from_own_file
from medfed.exceptions import ConfigError, LedgerError, PrivacyBudgetExceeded
from medfed.models.encoders import InputSpec
from medfed.privacy.accounting import MechanismStep, epsilon_spent
from medfed.privacy.guard import PrivacyGuard, SitePrivacy
from medfed.privacy.ledger import MECHANISM_NONE, verify_ledger
from medfed.task.algo import SiteAlgo
from medfed.task.model_setup import finetune_shared_keys, new_classifier, new_encoder

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def site(shared_data: Path):
    return site_from_own_file(load_medmnist(str(shared_data / "breastmnist.npz")), 0, 0.1, 0)


def cfg(**changes: object) -> RunConfig:
    base = dict(data="breastmnist", pretrain="none", width=8, finetune_batch_size=16, finetune_rounds=4, dp="finetune",
                dp_noise_multiplier=1.2, dp_delta=1e-4, dp_epsilon=20.0)
    base.update(changes)
    return run_config(**base)  # type: ignore[arg-type]


def guard(c: RunConfig, folder: Path, node_config: dict | None = None) -> PrivacyGuard:
    return PrivacyGuard(SitePrivacy.resolve(c, "0", node_config or {}, folder), "run-1")


def start_state(c: RunConfig, site) -> dict[str, torch.Tensor]:
    return new_classifier(c, site.spec, site.task, site.num_classes, None).state_dict()


def test_epsilon_is_cumulative_across_rounds_and_survives_a_restart(site, tmp_path: Path) -> None:
    c = cfg()
    state = start_state(c, site)
    reported = []
    for rnd in (1, 2):  # one "process"
        shared, stats = SiteAlgo(c, site, guard(c, tmp_path)).finetune_round(state, rnd)
        state.update(shared)
        reported.append(stats.privacy[MetricKey.EPSILON])
    # a restart: new guard objects, same files; the accountant is rebuilt from the ledger
    shared, stats = SiteAlgo(c, site, guard(c, tmp_path)).finetune_round(state, 3)
    reported.append(stats.privacy[MetricKey.EPSILON])
    n = len(site.labelled_images)
    step = MechanismStep(1.2, min(1.0, 16 / n), -(-n // 16))
    expected = [epsilon_spent([step] * k, 1e-4, "rdp") for k in (1, 2, 3)]
    assert reported == pytest.approx(expected, rel=1e-9)  # not a per-round epsilon
    entries = verify_ledger(tmp_path / "site-0.ledger.sqlite").entries
    assert [e.server_round for e in entries] == [1, 2, 3]
    assert [e.epsilon_after for e in entries] == pytest.approx(expected, rel=1e-9)
    assert (tmp_path / "site-0.pub").is_file()
    assert oct((tmp_path / "site-0.ed25519.pem").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("chosen,pretrain,encoder,pretrain_mode,finetune_mode", [
    ("auto", "byol", "cnn", "hooks", "ew"), ("auto", "mae", "vit", "hooks", "hooks"),
    ("hooks", "byol", "cnn", "hooks", "hooks"), ("functorch", "byol", "cnn", "functorch", "functorch"),
])
def test_the_grad_sample_mode_each_phase_runs_with(site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chosen: str,
                                                  pretrain: str, encoder: str, pretrain_mode: str,
                                                  finetune_mode: str) -> None:
    """auto (the default): expanded weights for fine-tuning a CNN (faster on CPU), Opacus' hooks for pretraining
    and for the ViT (whose patch embedding PyTorch's expanded weights cannot handle)."""
    from medfed.task import algo

    seen: list[str] = []
    real = algo.dp_train_loop

    def spy(*args, **kwargs):
        seen.append(args[4].grad_sample_mode)
        return real(*args, **kwargs)

    monkeypatch.setattr(algo, "dp_train_loop", spy)
    assert RunConfig().privacy.grad_sample_mode == "auto"
    c = cfg(dp="all", pretrain=pretrain, encoder=encoder, dp_grad_sample_mode=chosen, pretrain_batch_size=16)
    worker = SiteAlgo(c, site, guard(c, tmp_path))
    encoder, _, _ = worker.pretrain_round(new_encoder(c, site.spec).state_dict(), None, 1)
    worker.finetune_round(new_classifier(c, site.spec, site.task, site.num_classes, encoder).state_dict(), 1)
    assert seen == [pretrain_mode, finetune_mode]


def test_refusal_at_the_budget_writes_nothing(site, tmp_path: Path) -> None:
    n = len(site.labelled_images)
    step = MechanismStep(1.2, min(1.0, 16 / n), -(-n // 16))
    budget = (epsilon_spent([step], 1e-4, "rdp") + epsilon_spent([step] * 2, 1e-4, "rdp")) / 2
    c = cfg(dp_epsilon=budget)
    state = start_state(c, site)
    SiteAlgo(c, site, guard(c, tmp_path)).finetune_round(state, 1)
    ledger = tmp_path / "site-0.ledger.sqlite"
    before = ledger.read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match="refuses the round"):
        SiteAlgo(c, site, guard(c, tmp_path)).finetune_round(state, 2)
    assert ledger.read_bytes() == before


def test_planned_noise_spends_nearly_all_of_the_budget_and_never_more(site, tmp_path: Path) -> None:
    c = cfg(dp_noise_multiplier=0.0, dp_epsilon=4.0, finetune_rounds=3)
    state = start_state(c, site)
    sigmas = []
    for rnd in (1, 2, 3):
        shared, stats = SiteAlgo(c, site, guard(c, tmp_path)).finetune_round(state, rnd)
        state.update(shared)
        sigmas.append(stats.privacy[MetricKey.NOISE_MULTIPLIER])
    final = stats.privacy[MetricKey.EPSILON]
    assert 0.97 * 4.0 <= final <= 4.0, final
    assert max(sigmas) / min(sigmas) < 1.01  # one plan, kept
    # An unplanned fourth round only fits with far more noise (the planner finds it), or is refused.
    try:
        _, extra = SiteAlgo(c.replace(finetune_rounds=4), site, guard(c, tmp_path)).finetune_round(state, 4)
    except PrivacyBudgetExceeded:
        return
    assert extra.privacy[MetricKey.EPSILON] <= 4.0
    assert extra.privacy[MetricKey.NOISE_MULTIPLIER] > 5 * sigmas[0]


def test_a_site_node_config_can_lower_the_budget_never_raise_it(tmp_path: Path) -> None:
    c = cfg(dp_epsilon=5.0)
    assert SitePrivacy.resolve(c, "0", {"dp-epsilon": 2.0}, tmp_path).epsilon == 2.0
    assert SitePrivacy.resolve(c, "0", {"dp-epsilon": 50.0}, tmp_path).epsilon == 5.0
    own = SitePrivacy.resolve(
        c, "0", {"ledger-path": str(tmp_path / "h1.sqlite"), "signing-key": str(tmp_path / "k.pem")}, tmp_path
    )
    assert own.ledger_path == tmp_path / "h1.sqlite" and own.key_path == tmp_path / "k.pem"
    with pytest.raises(ConfigError, match="dp-epsilon"):
        SitePrivacy.resolve(c, "0", {"dp-epsilon": "lots"}, tmp_path)


def test_a_ledger_signed_by_another_key_is_refused(site, tmp_path: Path) -> None:
    c = cfg()
    SiteAlgo(c, site, guard(c, tmp_path)).finetune_round(start_state(c, site), 1)
    intruder = {"signing-key": str(tmp_path / "other.ed25519.pem")}
    with pytest.raises(LedgerError, match="another key"):
        SiteAlgo(c, site, guard(c, tmp_path, intruder)).finetune_round(start_state(c, site), 2)


def test_delta_above_one_over_site_size_is_refused_before_training(site, tmp_path: Path) -> None:
    c = cfg(dp_delta=0.5)
    with pytest.raises(ConfigError, match="delta"):
        SiteAlgo(c, site, guard(c, tmp_path)).finetune_round(start_state(c, site), 1)
    assert not (tmp_path / "site-0.ledger.sqlite").exists()


def test_non_dp_phases_are_recorded_as_uncovered_exposure(site, tmp_path: Path) -> None:
    c = cfg(pretrain="restore", pretrain_rounds=1, pretrain_batch_size=64)  # dp finetune only
    algo = SiteAlgo(c, site, guard(c, tmp_path))
    from medfed.task.model_setup import initial_encoder_state

    _, _, stats = algo.pretrain_round(initial_encoder_state(c, site.spec), None, 1)
    entries = verify_ledger(tmp_path / "site-0.ledger.sqlite").entries
    assert [(e.mechanism, e.phase) for e in entries] == [(MECHANISM_NONE, Phase.PRETRAIN.value)]
    assert stats.privacy[MetricKey.EPSILON] == 0.0


# ---- LoRA ---------------------------------------------------------------------------


def test_lora_starts_equal_to_the_pretrained_encoder_and_shares_adapters_only() -> None:
    spec = InputSpec(1, (28, 28))
    plain = run_config(pretrain="none", width=16)
    lora = plain.replace(finetune_mode="lora")
    torch.manual_seed(0)
    encoder_state = new_classifier(plain, spec, TaskType.BINARY, 2, None).encoder.state_dict()
    a = new_classifier(plain, spec, TaskType.BINARY, 2, encoder_state)
    b = new_classifier(lora, spec, TaskType.BINARY, 2, encoder_state)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))  # lora_B starts at zero
    keys = list(b.state_dict())
    shared = finetune_shared_keys(lora, keys)
    assert shared and all("lora_" in k or k.startswith("head.") for k in shared)
    trainable = {n for n, p in b.named_parameters() if p.requires_grad}
    assert trainable == set(shared)  # what trains is exactly what travels
    state = b.state_dict()
    full_bytes = sum(v.numel() * v.element_size() for k, v in encoder_state.items())
    lora_bytes = sum(state[k].numel() * state[k].element_size() for k in shared)
    assert lora_bytes <= full_bytes / 20


def test_lora_on_a_3d_encoder_and_a_vit() -> None:
    for c, spec in ((run_config(pretrain="none", width=8, finetune_mode="lora"), InputSpec(1, (28, 28, 28))),
                    (run_config(pretrain="mae", width=8, finetune_mode="lora"), InputSpec(1, (28, 28)))):
        model = new_classifier(c, spec, TaskType.BINARY, 2, None)
        assert any("lora_A" in k for k in model.state_dict())
        from medfed.privacy.dp_sgd import check_private_model

        check_private_model(model)


# ---- no schedule overspends (the real guard and ledger, across "runs") -----------------

ROUND = st.tuples(st.floats(0.02, 0.6), st.integers(1, 30), st.one_of(st.just(0.0), st.floats(0.4, 4.0)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.floats(0.3, 8.0), runs=st.lists(st.lists(ROUND, min_size=1, max_size=6), min_size=1, max_size=3))
def test_no_generated_schedule_of_rounds_and_runs_overspends(tmp_path_factory, budget: float, runs: list) -> None:
    folder = tmp_path_factory.mktemp("ledger")
    c = cfg(dp_epsilon=budget, dp_delta=1e-5)
    for run_index, rounds in enumerate(runs):
        g = PrivacyGuard(SitePrivacy.resolve(c, "0", {}, folder), f"run-{run_index}")  # a new process per run
        for i, (q, steps, sigma) in enumerate(rounds):
            later = [(r[0], r[1]) for r in rounds[i + 1:]]
            try:
                if sigma > 0:
                    g = PrivacyGuard(SitePrivacy.resolve(c.replace(dp_noise_multiplier=sigma), "0", {}, folder),
                                     f"run-{run_index}")
                else:
                    g = PrivacyGuard(SitePrivacy.resolve(c, "0", {}, folder), f"run-{run_index}")
                plan = g.plan(q, steps, later)
            except PrivacyBudgetExceeded:
                # a refusal must be justified: the round at the given noise would overspend
                if sigma > 0:
                    assert epsilon_spent(g.history() + [MechanismStep(sigma, q, steps)], 1e-5, "rdp") > budget
                continue
            g.record_dp(plan, Phase.FINETUNE, i + 1)
    ledger = folder / "site-0.ledger.sqlite"
    entries = verify_ledger(ledger).entries if ledger.exists() else []
    assert all(e.epsilon_after <= budget * (1 + 1e-9) for e in entries)
    history = [MechanismStep(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    assert epsilon_spent(history, 1e-5, "rdp") <= budget * (1 + 1e-9)


# ---- a run's share of the budget (dp-run-epsilon) and the noise limit (dp-max-planned-noise) -----------

def _run(c: RunConfig, folder: Path, run_id: str, rounds: int = 10, q: float = 64 / 188, steps: int = 3,
         first: int = 1, last: int = 10) -> list[float]:
    """Plan and record DP rounds ``first..last`` of a run of ``rounds`` as a site does (a new guard per round,
    the run's later rounds planned); their sigmas."""
    sigmas = []
    for rnd in range(first, last + 1):
        g = PrivacyGuard(SitePrivacy.resolve(c, "0", {}, folder), run_id)
        plan = g.plan(q, steps, [(q, steps)] * (rounds - rnd))
        g.record_dp(plan, Phase.FINETUNE, rnd)
        sigmas.append(plan.noise_multiplier)
    return sigmas


def _spent(folder: Path) -> float:
    entries = verify_ledger(folder / "site-0.ledger.sqlite").entries
    return epsilon_spent([MechanismStep(e.noise_multiplier, e.sample_rate, e.steps) for e in entries], 1e-5, "rdp")


def test_each_run_plans_for_its_share_and_a_resumed_run_keeps_counting_from_its_start(tmp_path: Path) -> None:
    c = cfg(dp_noise_multiplier=0.0, dp_epsilon=8.0, dp_delta=1e-5, dp_run_epsilon=4.0)
    first = _run(c, tmp_path, "run-1")
    assert first[0] == pytest.approx(2.4408852759176307, rel=1e-9)  # tests/test_accounting.py GOLDEN_RUN_PLANS
    assert 0.999 * 4.0 <= _spent(tmp_path) <= 4.0  # the first run left half of the budget
    second = _run(c, tmp_path, "run-2", last=5)  # stopped after 5 of its 10 rounds ...
    assert second[0] == pytest.approx(1.6540744137391263, rel=1e-3)  # GOLDEN_RUN_PLANS, from the ledger's rows
    resumed = _run(c, tmp_path, "run-2", first=6)  # ... and resumed (same run id): counted from its start, not ~6
    assert max(second + resumed) / min(second + resumed) < 1.01
    assert 0.999 * 8.0 <= _spent(tmp_path) <= 8.0  # 4 + 4: the shares add up to the lifetime budget


def test_a_run_after_one_that_spent_the_whole_budget_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    c = cfg(dp_noise_multiplier=0.0, dp_epsilon=8.0, dp_delta=1e-5)  # dp-run-epsilon 0: all that is left
    assert _run(c, tmp_path, "run-1")[0] == pytest.approx(1.4724421551562135, rel=1e-9)
    ledger = tmp_path / "site-0.ledger.sqlite"
    before = ledger.read_bytes()
    g = PrivacyGuard(SitePrivacy.resolve(c, "0", {}, tmp_path), "run-2")
    with pytest.raises(PrivacyBudgetExceeded) as info:
        g.plan(64 / 188, 3, [(64 / 188, 3)] * 9)
    # re-planned every round, the first run spent even closer to 8 than one plan of 10 rounds (which leaves 0.0061
    # and a second run sigma 31.1: tests/test_accounting.py)
    assert str(info.value) == ("site 0 has epsilon 0.000578 of 8 left; this run's plan needs sigma > 50 > 20 "
                               "(dp-max-planned-noise): refused (too little budget left to train anything useful; "
                               "docs/PRIVACY.md)")
    assert ledger.read_bytes() == before
    own = SitePrivacy.resolve(c.replace(dp_max_planned_noise=40.0, dp_run_epsilon=3.0), "0", {}, tmp_path)
    assert (own.max_planned_noise, own.run_epsilon) == (40.0, 3.0)


def test_a_given_noise_multiplier_may_not_pass_the_runs_share(tmp_path: Path) -> None:
    c = cfg(dp_epsilon=8.0, dp_delta=1e-5, dp_noise_multiplier=3.0, dp_run_epsilon=1.0)
    g = PrivacyGuard(SitePrivacy.resolve(c, "0", {}, tmp_path), "run-1")
    for rnd in (1, 2, 3):  # epsilon 0.627, 0.831, 0.992 (RDP, delta 1e-5)
        g.record_dp(g.plan(0.2, 3, []), Phase.FINETUNE, rnd)
    with pytest.raises(PrivacyBudgetExceeded,
                       match=r"^site 0 refuses the round: epsilon would reach 1.131 > 1, this "
                             r"run's share \(dp-run-epsilon 1 from 0 when the run began; sigma 3"):
        g.plan(0.2, 3, [])
    assert _spent(tmp_path) == pytest.approx(0.9923369638853572, rel=1e-9)
    # the next run has a share of its own, counted from the 0.992 spent when it begins
    later = PrivacyGuard(SitePrivacy.resolve(c, "0", {}, tmp_path), "run-2").plan(0.2, 3, [])
    assert 0.992 < later.projected < 1.992
