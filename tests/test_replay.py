"""A resumed server asks a site for a round it already released: the site re-sends that release,
and its ledger gets no second row (no privacy spent twice for one round)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_metadata
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from medfed.client_app import app as client_app
from medfed.config import RunConfig, run_config
from medfed.constants import MessageKey, TaskType
from medfed.data.site_files import write_site_files
from medfed.data.spec import DataSpec
from medfed.privacy.ledger import verify_ledger
from medfed.task.replay import Release, ReleaseCache, release_key


def test_release_key_changes_with_every_part_of_the_request() -> None:
    w = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    base = release_key("run", "finetune", 3, {"x": 1}, w)
    assert base == release_key("run", "finetune", 3, {"x": 1}, {"a": w["a"].clone()})
    changed = [
        release_key("run2", "finetune", 3, {"x": 1}, w), release_key("run", "pretrain", 3, {"x": 1}, w),
        release_key("run", "finetune", 4, {"x": 1}, w), release_key("run", "finetune", 3, {"x": 2}, w),
        release_key("run", "finetune", 3, {"x": 1}, {"a": w["a"] + 1e-7}),
        release_key("run", "finetune", 3, {"x": 1}, {"a": w["a"].reshape(3, 2)}),
        release_key("run", "finetune", 3, {"x": 1}, {"b": w["a"]}),
    ]
    assert len({base, *changed}) == 1 + len(changed)


def test_cache_round_trip_replaces_and_ignores_other_requests(tmp_path: Path) -> None:
    cache = ReleaseCache(tmp_path / "releases")
    assert cache.get("r", "finetune", "k1") is None
    cache.put("r", "finetune", "k1", Release({"w": torch.ones(2)}, {"epsilon": 1.5}))
    kept = cache.get("r", "finetune", "k1")
    assert kept is not None and torch.equal(kept.arrays["w"], torch.ones(2)) and kept.metrics == {"epsilon": 1.5}
    assert cache.get("r", "finetune", "k2") is None and cache.get("r", "pretrain", "k1") is None
    cache.put("r", "finetune", "k2", Release({"w": torch.zeros(2)}, {}))  # the next round replaces it
    assert cache.get("r", "finetune", "k1") is None and cache.get("r", "finetune", "k2") is not None
    assert [p.name.endswith(".tmp") for p in (tmp_path / "releases").iterdir()] == [False]
    next((tmp_path / "releases").iterdir()).write_bytes(b"garbage")  # unreadable: train again, never crash
    assert cache.get("r", "finetune", "k2") is None


@pytest.fixture()
def deployed_site(tmp_path: Path, shared_data: Path) -> Context:
    files = write_site_files(str(shared_data / "breastmnist.npz"), ["h1", "h2"], tmp_path / "sites")
    node_config = {"data-path": str(files["h1"]), "site-id": 0, "site-name": "h1",
                   "ledger-path": str(tmp_path / "h1" / "h1.ledger.sqlite"),
                   "signing-key": str(tmp_path / "h1" / "ledger.ed25519.pem")}
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def finetune_message(cfg: RunConfig, state: dict[str, torch.Tensor], rnd: int) -> Message:
    run_input = DataSpec(1, (28, 28), TaskType.BINARY, 2, "breastmnist").to_flat()  # what the ServerApp sends
    config = ConfigRecord({**cfg.to_flat(), "phase": "finetune", "server-round": rnd,
                           MessageKey.RUN_ID.value: "deploy-1/federated-none", **run_input})
    return Message(RecordDict({"arrays": ArrayRecord(state), "config": config}), metadata=make_metadata(dst_node_id=5))


def test_a_repeated_dp_round_is_answered_with_the_same_release_and_no_new_ledger_row(deployed_site: Context) -> None:
    from medfed.models.encoders import InputSpec
    from medfed.task.model_setup import new_classifier

    cfg = run_config(data="breastmnist", pretrain="none", width=8, finetune_batch_size=16, finetune_rounds=4,
                    dp="finetune", dp_epsilon=8.0, dp_delta=1e-4, site_data="own")
    state = new_classifier(cfg, InputSpec(1, (28, 28)), "binary-class", 2, None).state_dict()
    ledger = Path(str(deployed_site.node_config["ledger-path"]))
    first = client_app(finetune_message(cfg, state, 1), deployed_site)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    rows = verify_ledger(ledger).entries
    assert len(rows) == 1 and rows[0].site == "h1"
    resumed = cfg.replace(resume_from="/centre/runs/.deploy.partial")  # the resumed server asks again
    again = client_app(finetune_message(resumed, state, 1), deployed_site)
    metrics = dict(next(iter(again.content.metric_records.values())))
    assert metrics["replayed"] == 1.0
    assert metrics["epsilon"] == dict(next(iter(first.content.metric_records.values())))["epsilon"]
    for key, array in first.content["arrays"].items():  # bit for bit the release it made
        assert (again.content["arrays"][key].numpy() == array.numpy()).all()
    assert len(verify_ledger(ledger).entries) == 1  # nothing spent twice
    # the next round (or other weights) is a new release with its own row
    new = client_app(finetune_message(cfg, state, 2), deployed_site)
    assert "replayed" not in dict(next(iter(new.content.metric_records.values())))
    assert len(verify_ledger(ledger).entries) == 2


def test_a_deployed_sites_personal_head_survives_an_empty_node_state(deployed_site: Context) -> None:
    """A resumed run is a new Flower run (its node state starts empty), a SuperNode may restart: a deployed site
    restores the state it kept after its last round from its own disk (the release file), so its personal head
    goes on; and a replayed round hands back the state kept after it."""
    from medfed.models.encoders import InputSpec
    from medfed.task.model_setup import new_classifier

    cfg = run_config(data="breastmnist", pretrain="none", width=8, finetune_batch_size=16, finetune_rounds=4,
                     personal="head", finetune_lr=1e-9, site_data="own")
    state = new_classifier(cfg, InputSpec(1, (28, 28)), "binary-class", 2, None).state_dict()
    assert not client_app(finetune_message(cfg, state, 1), deployed_site).has_error()
    own = deployed_site.state.array_records["site-personal"].to_torch_state_dict()
    flipped = {**state, "head.weight": state["head.weight"].flip(0), "head.bias": state["head.bias"].flip(0)}
    restarted = Context(run_id=2, node_id=5, node_config=deployed_site.node_config, state=RecordDict(),
                        run_config={})
    replayed = client_app(finetune_message(cfg, state, 1), restarted)  # round 1 asked again: replayed, state back
    assert dict(next(iter(replayed.content.metric_records.values())))["replayed"] == 1.0
    assert torch.equal(restarted.state.array_records["site-personal"].to_torch_state_dict()["head.weight"],
                       own["head.weight"])
    empty = Context(run_id=3, node_id=5, node_config=deployed_site.node_config, state=RecordDict(), run_config={})
    back = client_app(finetune_message(cfg, flipped, 2), empty).content["arrays"].to_torch_state_dict()
    assert torch.allclose(back["head.weight"], own["head.weight"], atol=1e-5)  # its own head, from its disk
    from medfed.task.site_state import StateStamp

    other_run = StateStamp.of("another-run/arm", {}).seal({k: v + 5.0 for k, v in own.items()
                                                          if not k.startswith("stamp/")})
    holding_other = Context(run_id=5, node_id=5, node_config=deployed_site.node_config,
                            state=RecordDict({"site-personal": ArrayRecord(other_run)}), run_config={})
    back = client_app(finetune_message(cfg, flipped, 3), holding_other).content["arrays"].to_torch_state_dict()
    assert torch.allclose(back["head.weight"], own["head.weight"], atol=1e-5)  # another run's dropped, disk's used
    train = finetune_message(cfg, flipped, 2)
    evaluation = Message(train.content, metadata=make_metadata(dst_node_id=5, message_type="evaluate"))
    fresh = Context(run_id=4, node_id=5, node_config=deployed_site.node_config, state=RecordDict(), run_config={})
    metrics = dict(next(iter(client_app(evaluation, fresh).content.metric_records.values())))
    assert "personal-auc" in metrics and not any(k.startswith("personal-test-") for k in metrics)  # no test share
