"""A site under DP without Flower: cumulative accounting from the ledger, planning, refusal,
restart round trip, uncovered exposure, LoRA structure and its privacy-safe shared keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medfed.client.algo import SiteAlgo, finetune_shared_keys, new_classifier, new_encoder
from medfed.config import RunConfig
from medfed.constants import MetricKey, Phase, TaskType
from medfed.data.medmnist import load_medmnist
from medfed.data.site import site_from_own_file
from medfed.exceptions import ConfigError, LedgerError, PrivacyBudgetExceeded
from medfed.models.encoders import InputSpec
from medfed.privacy.accounting import MechanismStep, epsilon_spent
from medfed.privacy.guard import PrivacyGuard, SitePrivacy
from medfed.privacy.ledger import MECHANISM_NONE, verify_ledger

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def site(shared_data: Path):
    return site_from_own_file(load_medmnist(str(shared_data / "breastmnist.npz")), 0, 0.1, 0)


def cfg(**changes: object) -> RunConfig:
    base = dict(data="breastmnist", pretrain="none", width=8, finetune_batch_size=16, finetune_rounds=4, dp="finetune",
                dp_noise_multiplier=1.2, dp_delta=1e-4, dp_epsilon=20.0)
    base.update(changes)
    return RunConfig(**base)  # type: ignore[arg-type]


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
    assert (tmp_path / "site-0.pub").is_file() and oct((tmp_path / "site-0.ed25519.pem").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("chosen,pretrain,encoder,pretrain_mode,finetune_mode", [
    ("auto", "byol", "cnn", "hooks", "ew"), ("auto", "mae", "vit", "hooks", "hooks"),
    ("hooks", "byol", "cnn", "hooks", "hooks"), ("functorch", "byol", "cnn", "functorch", "functorch"),
])
def test_the_grad_sample_mode_each_phase_runs_with(site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chosen: str,
                                                  pretrain: str, encoder: str, pretrain_mode: str,
                                                  finetune_mode: str) -> None:
    """auto (the default): expanded weights for fine-tuning a CNN (faster on CPU), Opacus' hooks for pretraining
    and for the ViT (whose patch embedding PyTorch's expanded weights cannot handle)."""
    from medfed.client import algo

    seen: list[str] = []
    real = algo.dp_train_loop

    def spy(*args, **kwargs):
        seen.append(args[4].grad_sample_mode)
        return real(*args, **kwargs)

    monkeypatch.setattr(algo, "dp_train_loop", spy)
    assert RunConfig().dp_grad_sample_mode == "auto"
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
    own = SitePrivacy.resolve(c, "0", {"ledger-path": str(tmp_path / "h1.sqlite"), "signing-key": str(tmp_path / "k.pem")}, tmp_path)
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
    from medfed.client.algo import initial_encoder_state

    _, _, stats = algo.pretrain_round(initial_encoder_state(c, site.spec), None, 1)
    entries = verify_ledger(tmp_path / "site-0.ledger.sqlite").entries
    assert [(e.mechanism, e.phase) for e in entries] == [(MECHANISM_NONE, Phase.PRETRAIN.value)]
    assert stats.privacy[MetricKey.EPSILON] == 0.0


# ---- LoRA ---------------------------------------------------------------------------


def test_lora_starts_equal_to_the_pretrained_encoder_and_shares_adapters_only() -> None:
    spec = InputSpec(1, (28, 28))
    plain = RunConfig(pretrain="none", width=16)
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
    for c, spec in ((RunConfig(pretrain="none", width=8, finetune_mode="lora"), InputSpec(1, (28, 28, 28))),
                    (RunConfig(pretrain="mae", width=8, finetune_mode="lora"), InputSpec(1, (28, 28)))):
        model = new_classifier(c, spec, TaskType.BINARY, 2, None)
        assert any("lora_A" in k for k in model.state_dict())
        from medfed.privacy.dp_sgd import check_private_model

        check_private_model(model)


# ---- no schedule overspends (the real guard and ledger, across "runs") -----------------

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
                    g = PrivacyGuard(SitePrivacy.resolve(c.replace(dp_noise_multiplier=sigma), "0", {}, folder), f"run-{run_index}")
                else:
                    g = PrivacyGuard(SitePrivacy.resolve(c, "0", {}, folder), f"run-{run_index}")
                plan = g.plan(q, steps, later)
            except PrivacyBudgetExceeded:
                # a refusal must be justified: the round at the given noise would overspend
                if sigma > 0:
                    assert epsilon_spent(g.history() + [MechanismStep(sigma, q, steps)], 1e-5, "rdp") > budget
                continue
            g.record_dp(plan, Phase.FINETUNE, i + 1)
    entries = verify_ledger(folder / "site-0.ledger.sqlite").entries if (folder / "site-0.ledger.sqlite").exists() else []
    assert all(e.epsilon_after <= budget * (1 + 1e-9) for e in entries)
    history = [MechanismStep(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    assert epsilon_spent(history, 1e-5, "rdp") <= budget * (1 + 1e-9)
