"""What a site sends: only the shared weights and scalar metrics (the encoder-only contract).

The real ClientApp is called with real Flower messages on BreastMNIST; the reply is inspected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_metadata
from flwr.app import ArrayRecord, Context, Message, RecordDict

from medfed.client_app import app as client_app
from medfed.config import run_config
from medfed.constants import Phase
from medfed.data.partition import SPLIT_FILE, SitePlan
from medfed.experiment.phases import ArmContext
from medfed.experiment.prepare import prepare
from medfed.experiment.recorder import Recorder
from medfed.privacy.ledger import verify_ledger
from medfed.strategies.shared_weights import check_evaluate_reply
from medfed.task.calibration import HIST_NEGATIVE, HIST_POSITIVE, HISTOGRAM_KEYS
from medfed.task.model_setup import finetune_shared_keys, new_classifier, new_encoder

ALLOWED_METRICS = {"num-examples", "site-id", "train-loss", "steps", "train-seconds"}


@pytest.fixture()
def arm(tmp_path: Path, data_path_env: Path) -> ArmContext:
    def make(**changes: object) -> ArmContext:
        cfg = run_config(data="breastmnist", num_sites=2, pretrain_batch_size=64, finetune_batch_size=16, width=8,
                         **changes)
        prep = prepare(cfg)
        prep.plan.save(tmp_path / SPLIT_FILE)
        return ArmContext("test", cfg, tmp_path, prep.data.path, prep.test, Recorder(tmp_path / "m.jsonl"))

    return make  # type: ignore[return-value]


def send(
    ctx: ArmContext, phase: Phase, arrays: dict[str, torch.Tensor], context: Context, kind: str = "train", rnd: int = 1
) -> Message:
    config = ctx.message_config(phase)
    config["server-round"] = rnd
    msg = Message(RecordDict({"arrays": ArrayRecord(arrays), "config": config}),
                  metadata=make_metadata(dst_node_id=5, message_type=kind))
    return client_app(msg, context)


def site_context(site: int = 0) -> Context:
    return Context(run_id=1, node_id=5, node_config={"partition-id": site, "num-partitions": 2}, state=RecordDict(),
                   run_config={})


def assert_no_data_leaves(reply: Message, n_images: int, image_shape: tuple[int, ...]) -> None:
    for record in reply.content.array_records.values():
        for key, array in record.items():
            shape = tuple(array.shape)
            assert shape[-len(image_shape):] != image_shape, f"{key} has an image-shaped tail {shape}"
            assert not shape or shape[0] != n_images, f"{key} has one row per image {shape}"
    metrics = next(iter(reply.content.metric_records.values()))
    assert set(metrics) <= ALLOWED_METRICS, set(metrics) - ALLOWED_METRICS
    assert all(not isinstance(v, list) for v in metrics.values())
    assert not reply.content.config_records


@pytest.mark.parametrize("method", ["simclr", "byol", "simclr+restore", "mae"])
def test_pretrain_reply_holds_exactly_the_encoder(arm, method: str) -> None:
    ctx = arm(pretrain=method, pretrain_epochs=1)
    encoder = new_encoder(ctx.cfg, ctx.test.spec).state_dict()
    context = site_context(0)
    reply = send(ctx, Phase.PRETRAIN, encoder, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    sent_back = reply.content["arrays"]
    assert list(sent_back.keys()) == list(encoder.keys())
    for key, value in encoder.items():
        assert tuple(sent_back[key].shape) == tuple(value.shape)
    assert (sum(a.numpy().nbytes for a in sent_back.values())
            == sum(v.numel() * v.element_size() for v in encoder.values()))
    n_site = len(SitePlan.load(ctx.run_dir / SPLIT_FILE).sites[0].train)
    assert_no_data_leaves(reply, n_site, (28, 28))
    # the heads stayed at the site, in its state, and none of them was sent
    local = context.state.array_records["site-local"]
    assert len(local) > 0 and not set(local.keys()) & set(sent_back.keys())
    head_prefix = {"simclr": "projector", "byol": "predictor", "simclr+restore": "parts.1.decoder",
                   "mae": "decoder_pred"}[method]
    assert any(k.startswith(head_prefix) for k in local.keys())
    changed = [k for k in encoder if not np.allclose(sent_back[k].numpy(), encoder[k].numpy())]
    assert len(changed) > len(encoder) // 2  # the encoder was trained


def test_byol_target_persists_at_the_site_between_rounds(arm) -> None:
    ctx = arm(pretrain="byol", pretrain_epochs=1)
    encoder = new_encoder(ctx.cfg, ctx.test.spec).state_dict()
    context = site_context(1)
    send(ctx, Phase.PRETRAIN, encoder, context, rnd=1)
    after_round_1 = context.state.array_records["site-local"].to_torch_state_dict()
    target_key = next(k for k in after_round_1 if k.startswith("target_encoder."))
    reply = send(ctx, Phase.PRETRAIN, encoder, context, rnd=2)
    after_round_2 = context.state.array_records["site-local"].to_torch_state_dict()
    assert not torch.equal(after_round_1[target_key], after_round_2[target_key])  # kept and moved on
    assert target_key not in reply.content["arrays"]


def test_linear_probe_sends_only_the_head_and_full_sends_all(arm) -> None:
    for mode, expect_encoder in (("linear", False), ("full", True)):
        ctx = arm(pretrain="none", finetune_mode=mode, finetune_epochs=1)
        state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, ctx.test.num_classes, None).state_dict()
        reply = send(ctx, Phase.FINETUNE, state, site_context(0))
        keys = list(reply.content["arrays"].keys())
        assert keys == finetune_shared_keys(ctx.cfg, list(state))
        assert any(k.startswith("encoder.") for k in keys) is expect_encoder
        assert {"head.weight", "head.bias"} <= set(keys)
        assert_no_data_leaves(reply, len(SitePlan.load(ctx.run_dir / SPLIT_FILE).sites[0].labelled), (28, 28))


def test_evaluate_reply_holds_only_metrics(arm) -> None:
    ctx = arm(pretrain="none")
    state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, ctx.test.num_classes, None).state_dict()
    reply = send(ctx, Phase.FINETUNE, state, site_context(0), kind="evaluate")
    assert not reply.content.array_records
    metrics = next(iter(reply.content.metric_records.values()))
    assert {"auc", "accuracy", "sensitivity", "specificity", "fpr", "num-examples", "site-id"} <= set(metrics)
    lists = {k for k, v in metrics.items() if isinstance(v, list)}
    assert lists == set(HISTOGRAM_KEYS)  # a binary task: the score histograms its threshold is calibrated from
    assert sum(metrics[HIST_POSITIVE]) + sum(metrics[HIST_NEGATIVE]) == metrics["num-examples"]
    assert check_evaluate_reply(reply.content) == ""


def test_a_site_whose_data_changed_refuses(arm, tmp_path: Path) -> None:
    ctx = arm(pretrain="none")
    bogus = tmp_path / "breastmnist.npz"
    data = dict(np.load(ctx.data_file))
    data["train_images"] = data["train_images"].copy()
    data["train_images"][0] ^= 1
    np.savez_compressed(bogus, **data)
    ctx2 = ArmContext(ctx.arm, ctx.cfg, ctx.run_dir, bogus, ctx.test, ctx.recorder)
    state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, ctx.test.num_classes, None).state_dict()
    from medfed.client.redaction import SiteFailure

    # the runtime turns this into an error reply; the server reads the reason without the site's file path
    with pytest.raises(SiteFailure, match=r"DataError: breastmnist: contents differ .*sha256 mismatch.*incident"
                       ) as caught:
        send(ctx2, Phase.FINETUNE, state, site_context(0))
    assert str(tmp_path) not in str(caught.value) and "breastmnist.npz" not in str(caught.value)


# ---- under DP --------------------------------------------------------------------------

DP_METRICS = {"num-examples", "site-id", "steps", "train-seconds", "epsilon", "delta", "epsilon-budget",
              "noise-multiplier", "sample-rate", "dp-steps", "dp-grad-sample-mode"}


def test_a_dp_reply_reports_its_cost_and_keeps_the_loss_at_the_site(arm) -> None:
    ctx = arm(pretrain="none", dp="finetune", dp_epsilon=5.0, dp_delta=1e-4, label_fraction=0.3)
    state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, 2, None).state_dict()
    reply = send(ctx, Phase.FINETUNE, state, site_context(0))
    metrics = dict(next(iter(reply.content.metric_records.values())))
    assert set(metrics) == DP_METRICS
    assert 0 < metrics["epsilon"] <= 5.0 and metrics["noise-multiplier"] > 0
    ledger = ctx.ledger_dir / "site-0.ledger.sqlite"
    assert ledger.is_file()


def test_a_site_that_requires_dp_refuses_a_non_dp_round(arm) -> None:
    ctx = arm(pretrain="none")
    state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, 2, None).state_dict()
    context = Context(run_id=1, node_id=5,
                      node_config={"partition-id": 0, "num-partitions": 2, "dp-require": "finetune"},
                      state=RecordDict(), run_config={})
    reply = send(ctx, Phase.FINETUNE, state, context)
    assert not reply.content.array_records  # no weights leave
    assert "requires DP" in str(reply.content.config_records["refusal"]["reason"])
    assert dict(next(iter(reply.content.metric_records.values())))["refused"] == 1.0


def test_a_site_whose_budget_is_nearly_spent_refuses_a_useless_run_and_the_server_reads_why(arm) -> None:
    """Issue 12: after one run spent a site's whole budget, the next DP run would train at enormous noise. The site
    refuses (dp-max-planned-noise) with its standing, and the server's strategy reads the reply as a refusal."""
    from medfed.privacy.guard import PrivacyGuard, SitePrivacy
    from medfed.strategies.shared_weights import refusal_reason

    ctx = arm(pretrain="none", dp="finetune", dp_epsilon=5.0, dp_delta=1e-4, label_fraction=0.3)
    earlier = PrivacyGuard(SitePrivacy.resolve(ctx.cfg, "0", {}, ctx.ledger_dir), "an-earlier-run")
    earlier.record_dp(earlier.plan(1.0, 1, []), Phase.FINETUNE, 1)  # planned for the whole budget: spends ~all of it
    spent = earlier.spent()
    assert 4.99 < spent <= 5.0
    state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, 2, None).state_dict()
    reply = send(ctx, Phase.FINETUNE, state, site_context(0))
    assert not reply.content.array_records
    reason = refusal_reason(reply.content)
    assert reason is not None
    assert reason.startswith(f"site 0 has epsilon {5.0 - spent:.3g} of 5 left; this run's plan needs sigma ")
    assert "> 20 (dp-max-planned-noise): refused" in reason
    metrics = dict(next(iter(reply.content.metric_records.values())))
    assert metrics["refused"] == 1.0 and metrics["epsilon"] == pytest.approx(spent) and metrics["epsilon-budget"] == 5.0
    assert len(verify_ledger(ctx.ledger_dir / "site-0.ledger.sqlite").entries) == 1  # nothing written


# ---- issue 16: FedU, FedEMA, personal parts and probing: what a site sends and keeps --------------------------


def test_fedu_sends_the_encoder_and_byols_predictor_and_takes_the_global_predictor_only_when_near(arm) -> None:
    from medfed.selfsup.federated import PREDICTOR_PREFIX
    from medfed.task.model_setup import initial_pretrain_state

    for threshold, taken in ((10.0, True), (1e-9, False)):
        ctx = arm(pretrain="byol", ssl_aggregation="fedu", fedu_threshold=threshold, pretrain_lr=1e-9)
        sent = initial_pretrain_state(ctx.cfg, ctx.test.spec, new_encoder(ctx.cfg, ctx.test.spec).state_dict())
        predictor_keys = [k for k in sent if k.startswith(PREDICTOR_PREFIX)]
        assert predictor_keys and len(sent) == len(new_encoder(ctx.cfg, ctx.test.spec).state_dict()) + len(
            predictor_keys)
        context = site_context(0)
        first = send(ctx, Phase.PRETRAIN, sent, context, rnd=1)
        assert set(first.content["arrays"].keys()) == set(sent)  # exactly the encoder and the predictor
        own = {k: v.clone() for k, v in first.content["arrays"].to_torch_state_dict().items()}
        moved = {k: v + 1.0 for k, v in sent.items()}  # a global model far from the site's (relative > 1e-9)
        second = send(ctx, Phase.PRETRAIN, moved, context, rnd=2)
        metrics = second.content["metrics"]
        assert metrics["predictor-taken"] == float(taken) and metrics["ssl-divergence"] > 0
        back = second.content["arrays"].to_torch_state_dict()
        source = moved if taken else own  # lr 1e-9: what the round started from is what comes back
        for key in predictor_keys:
            assert torch.allclose(back[key], source[key], atol=1e-5), (threshold, key)
        assert all(torch.allclose(back[k], moved[k], atol=1e-5) for k in sent if k not in predictor_keys)


def test_fedema_starts_a_round_from_the_ema_of_its_own_encoder_and_the_global_one(arm) -> None:
    ctx = arm(pretrain="simclr", ssl_aggregation="fedema", fedema_tau=0.7, pretrain_lr=1e-9)
    encoder = new_encoder(ctx.cfg, ctx.test.spec).state_dict()
    context = site_context(1)
    own = send(ctx, Phase.PRETRAIN, encoder, context, rnd=1).content["arrays"].to_torch_state_dict()
    kept = context.state.array_records["site-local"].to_torch_state_dict()
    assert any(k.startswith("kept/encoder/") for k in kept)
    moved = {k: v + 0.5 if v.is_floating_point() else v for k, v in encoder.items()}
    reply = send(ctx, Phase.PRETRAIN, moved, context, rnd=2)
    assert reply.content["metrics"]["ema-decay"] == pytest.approx(0.7)  # the autoscaler's first mu is tau
    back = reply.content["arrays"].to_torch_state_dict()
    for key, value in moved.items():
        if value.is_floating_point():
            assert torch.allclose(back[key], 0.7 * own[key] + 0.3 * value, atol=1e-5), key


def test_a_personal_head_is_trained_from_the_sites_own_copy_and_evaluated_beside_the_global_model(arm) -> None:
    ctx = arm(pretrain="none", personal="head", finetune_lr=1e-9)
    state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, ctx.test.num_classes, None).state_dict()
    context = site_context(0)
    first = send(ctx, Phase.FINETUNE, state, context, rnd=1)
    assert set(first.content["arrays"].keys()) == set(state)  # the global model still averages the heads
    personal = context.state.array_records["site-personal"].to_torch_state_dict()
    assert set(personal) == {"head.weight", "head.bias", "stamp/run", "stamp/settings"}
    other_head = {**state, "head.weight": state["head.weight"].flip(0), "head.bias": state["head.bias"].flip(0)}
    back = send(ctx, Phase.FINETUNE, other_head, context, rnd=2).content["arrays"].to_torch_state_dict()
    assert torch.allclose(back["head.weight"], personal["head.weight"], atol=1e-5)  # its own, not the global one
    metrics = send(ctx, Phase.FINETUNE, other_head, context, kind="evaluate").content["metrics"]
    assert {"auc", "personal-auc", "personal-test-auc", "personal-test-num-examples"} <= set(metrics)
    assert metrics["personal-auc"] == pytest.approx(1 - metrics["auc"])  # the global head swaps the classes
    assert check_evaluate_reply(send(ctx, Phase.FINETUNE, other_head, context, kind="evaluate").content) == ""


def test_personal_norms_stay_the_sites_own_in_pretraining(arm) -> None:
    from medfed.models.parts import norm_parameter_keys

    ctx = arm(pretrain="simclr", personal="norm", pretrain_lr=1e-9)
    encoder_model = new_encoder(ctx.cfg, ctx.test.spec)
    encoder, norms = encoder_model.state_dict(), norm_parameter_keys(encoder_model)
    assert norms and all(".adn.N." in k for k in norms)
    context = site_context(0)
    own = send(ctx, Phase.PRETRAIN, encoder, context, rnd=1).content["arrays"].to_torch_state_dict()
    moved = {k: v + 1.0 for k, v in encoder.items()}
    back = send(ctx, Phase.PRETRAIN, moved, context, rnd=2).content["arrays"].to_torch_state_dict()
    for key in encoder:
        assert torch.allclose(back[key], own[key] if key in norms else moved[key], atol=1e-5), key


def test_probe_rounds_send_the_encoder_back_unchanged_then_train_it(arm) -> None:
    ctx = arm(pretrain="none", finetune_probe_rounds=1, finetune_rounds=3)
    state = new_classifier(ctx.cfg, ctx.test.spec, ctx.test.task, ctx.test.num_classes, None).state_dict()
    for rnd, encoder_trains in ((1, False), (2, True)):
        back = send(ctx, Phase.FINETUNE, state, site_context(0), rnd=rnd).content["arrays"].to_torch_state_dict()
        encoder_keys = [k for k in state if k.startswith("encoder.")]
        assert any(not torch.equal(back[k], state[k]) for k in encoder_keys) is encoder_trains
        assert not torch.equal(back["head.weight"], state["head.weight"])


def test_a_server_cannot_change_a_runs_settings_between_rounds_to_get_what_a_site_kept(arm) -> None:
    """The attack review's: after FedEMA rounds, switching the run to fedu for one round (threshold tiny, so the site
    would send its own predictor, never sent before) is refused; a new run id starts the site afresh."""
    from medfed.constants import MessageKey

    ctx = arm(pretrain="byol", ssl_aggregation="fedema")
    encoder = new_encoder(ctx.cfg, ctx.test.spec).state_dict()
    context = site_context(0)
    send(ctx, Phase.PRETRAIN, encoder, context, rnd=1)
    own_predictor = {k: v for k, v in context.state.array_records["site-local"].to_torch_state_dict().items()
                     if k.startswith("predictor.")}
    switched = arm(pretrain="byol", ssl_aggregation="fedu", fedu_threshold=1e-12)
    from medfed.task.model_setup import initial_pretrain_state

    sent = initial_pretrain_state(switched.cfg, switched.test.spec, {k: v + 0.01 for k, v in encoder.items()})
    from medfed.client.redaction import SiteFailure

    with pytest.raises(SiteFailure, match="ConfigError: this run's settings differ from those of its earlier rounds"):
        send(switched, Phase.PRETRAIN, sent, context, rnd=2)
    # a new run (another run id) does not see the first run's state: its predictor is fresh, not the kept one
    config_record = switched.message_config(Phase.PRETRAIN)
    config_record[MessageKey.RUN_ID.value] = "another-run/arm"
    config_record["server-round"] = 2
    msg = Message(RecordDict({"arrays": ArrayRecord(sent), "config": config_record}),
                  metadata=make_metadata(dst_node_id=5, message_type="train"))
    fresh = client_app(msg, context)
    assert not fresh.has_error(), fresh.error.reason if fresh.has_error() else ""
    assert fresh.content["metrics"].get("predictor-taken") is None  # no kept encoder of this run: first round
    released = fresh.content["arrays"].to_torch_state_dict()
    for key, value in own_predictor.items():
        assert not torch.allclose(released["ssl-predictor." + key.removeprefix("predictor.")], value, atol=1e-4)
