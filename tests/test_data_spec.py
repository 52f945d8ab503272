"""A deployed site's own data must match the run's input: the spec travels in every message, and a site whose
file differs (image size, colour, 2D/3D, task, class count) refuses before training, saying only how it differs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_metadata
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from medfed.client_app import app as client_app
from medfed.config import RunConfig, run_config
from medfed.constants import MessageKey, Phase, TaskType
from medfed.data.medmnist import load_medmnist
from medfed.data.spec import INPUT_KEYS, DataSpec, check_matches
from medfed.exceptions import ConfigError, DataError, DataMismatch
from medfed.experiment.phases import ArmContext
from medfed.experiment.prepare import prepare
from medfed.experiment.recorder import Recorder
from medfed.models.encoders import InputSpec
from medfed.strategies.shared_weights import refusal_reason
from medfed.task.model_setup import new_classifier

PNEUMONIA = DataSpec(1, (28, 28), TaskType.BINARY, 2, "pneumoniamnist")


# ---- the pure check (also what `medfed site` calls at start) ------------------------------

def test_the_message_names_both_inputs_and_what_differs() -> None:
    site = DataSpec(3, (32, 32), TaskType.BINARY, 2)
    with pytest.raises(DataMismatch) as info:
        check_matches(site, PNEUMONIA, "h2")
    assert str(info.value) == ("site h2's data is 3x32x32 RGB, binary; the run's input is 1x28x28 grayscale, binary "
                               "(pneumoniamnist): they differ in channels, image size")
    assert isinstance(info.value, DataError)


@pytest.mark.parametrize(("site", "text", "diff"), [
    (DataSpec(1, (32, 32), TaskType.BINARY, 2), "1x32x32 grayscale, binary", "image size"),
    (DataSpec(3, (28, 28), TaskType.BINARY, 2), "3x28x28 RGB, binary", "channels"),
    (DataSpec(1, (28, 28, 28), TaskType.BINARY, 2), "1x28x28x28 grayscale 3D, binary", "image dimensions (2D/3D)"),
    (DataSpec(1, (28, 28), TaskType.MULTICLASS, 3), "1x28x28 grayscale, multi-class (3 classes)", "task"),
    (DataSpec(1, (28, 28), TaskType.MULTILABEL, 14), "1x28x28 grayscale, multi-label (14 labels)", "task"),
])
def test_each_kind_of_difference_is_refused(site: DataSpec, text: str, diff: str) -> None:
    pattern = rf"^site 7's data is {re.escape(text)}; .*: they differ in {re.escape(diff)}$"
    with pytest.raises(DataMismatch, match=pattern):
        check_matches(site, PNEUMONIA, "7")


def test_class_count_differs_within_a_task_and_a_match_passes() -> None:
    run = DataSpec(3, (28, 28), TaskType.MULTICLASS, 9, "pathmnist")
    with pytest.raises(DataMismatch, match=r"multi-class \(7 classes\); the run's input is 3x28x28 RGB, multi-class "
                                           r"\(9 classes\) \(pathmnist\): they differ in number of classes$"):
        check_matches(DataSpec(3, (28, 28), TaskType.MULTICLASS, 7), run)
    check_matches(DataSpec(3, (28, 28), TaskType.MULTICLASS, 9), run)  # no name on the site's side: still a match
    check_matches(DataSpec(1, (28, 28), TaskType.BINARY, 2), PNEUMONIA, "h1")


def test_flat_round_trip_and_validation() -> None:
    flat = PNEUMONIA.to_flat()
    assert flat == {"input-name": "pneumoniamnist", "input-channels": 1, "input-shape": "28x28",
                    "input-task": "binary-class", "input-classes": 2}
    assert tuple(flat) == INPUT_KEYS
    assert DataSpec.from_flat(flat) == PNEUMONIA
    volume = DataSpec(1, (28, 28, 28), TaskType.MULTICLASS, 11, "organmnist3d")
    assert DataSpec.from_flat({**volume.to_flat(), "input-classes": 11.0}) == volume
    with pytest.raises(ConfigError, match=r"no input spec \(input-shape missing\)"):
        DataSpec.from_flat({k: v for k, v in flat.items() if k != "input-shape"})
    for key, bad, rule in [("input-shape", "28by28", "sizes joined by 'x'"), ("input-shape", "28", "2 or 3 sizes"),
                           ("input-shape", "0x28", "2 or 3 sizes >= 1"),
                           ("input-task", "ordinal", "input-task must be one of"),
                           ("input-channels", "1", "input-channels must be an integer"),
                           ("input-channels", 0, "input-channels must be an integer >= 1"),
                           ("input-classes", 1, "input-classes must be an integer >= 2"),
                           ("input-classes", 3, "must be 2 for a binary task"),
                           ("input-name", 5, "input-name must be a string")]:
        with pytest.raises(ConfigError, match=rule):
            DataSpec.from_flat({**flat, key: bad})


def test_spec_of_a_loaded_file(shared_data: Path) -> None:
    assert DataSpec.of(load_medmnist(str(shared_data / "breastmnist.npz"))) == DataSpec(1, (28, 28), TaskType.BINARY, 2)
    assert DataSpec.of(load_medmnist(str(shared_data / "adrenalmnist3d.npz")), "adrenalmnist3d").describe() == \
        "1x28x28x28 grayscale 3D, binary"


# ---- the spec travels with every message ----------------------------------------------------

def test_the_server_sends_the_runs_input_spec(tmp_path: Path, data_path_env: Path) -> None:
    cfg = run_config(data="breastmnist", pretrain="none", baselines="none", site_data="own", width=8)
    prep = prepare(cfg)
    ctx = ArmContext("federated-none", cfg, tmp_path, prep.data.path, prep.test, Recorder(tmp_path / "m.jsonl"))
    for phase in Phase:
        config = ctx.message_config(phase)
        assert DataSpec.from_flat(dict(config)) == DataSpec(1, (28, 28), TaskType.BINARY, 2, "breastmnist")
        # a deployed site is not told the centre's paths or output settings
        assert not {"run-dir", "data-file", "sim-ledger-dir", "out-dir", "data", "site-keys"} & set(config.keys())
        assert str(tmp_path) not in json.dumps(dict(config), default=str)


# ---- a deployed site refuses data that do not fit ----------------------------------------------

def _write(path: Path, source: Path, images=None, labels=None) -> Path:
    data = dict(np.load(source))
    for split in ("train", "val", "test"):
        if images is not None:
            data[f"{split}_images"] = images(data[f"{split}_images"])
        if labels is not None:
            data[f"{split}_labels"] = labels(data[f"{split}_labels"])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **data)
    return path


def _site(tmp_path: Path, data_file: Path) -> Context:
    node_config = {"data-path": str(data_file), "site-id": 1, "site-name": "h2",
                   "ledger-path": str(tmp_path / "h2" / "h2.ledger.sqlite"),
                   "signing-key": str(tmp_path / "h2" / "ledger.ed25519.pem")}
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def _message(cfg: RunConfig, run: DataSpec, kind: str = "train") -> Message:
    spec = InputSpec(run.channels, run.spatial_shape)
    state = new_classifier(cfg, spec, run.task, run.num_classes, None).state_dict()
    config = ConfigRecord({**cfg.to_flat(), "phase": "finetune", "server-round": 1,
                           MessageKey.RUN_ID.value: "deploy-1/federated-none", **run.to_flat()})
    return Message(RecordDict({"arrays": ArrayRecord(state), "config": config}),
                   metadata=make_metadata(dst_node_id=5, message_type=kind))


CFG = run_config(data="breastmnist", pretrain="none", width=8, finetune_batch_size=16, finetune_rounds=2,
                site_data="own")
BREAST = DataSpec(1, (28, 28), TaskType.BINARY, 2, "breastmnist")


@pytest.mark.parametrize(("name", "images", "labels", "site_text", "diff"), [
    ("breastmnist.npz", lambda x: np.pad(x, ((0, 0), (2, 2), (2, 2))), None, "1x32x32 grayscale, binary", "image size"),
    ("breastmnist.npz", lambda x: np.repeat(x[..., None], 3, axis=-1), None, "3x28x28 RGB, binary", "channels"),
    ("ward-b.npz", None, lambda y: np.where(np.arange(len(y))[:, None] % 3 == 2, 2, y),
     "1x28x28 grayscale, multi-class (3 classes)", "task"),
])
def test_a_site_whose_data_do_not_fit_refuses_before_training(tmp_path: Path, shared_data: Path, name: str, images,
                                                              labels, site_text: str, diff: str) -> None:
    source = shared_data / "breastmnist.npz"
    secret = tmp_path / "patient-0042-mrn-991" / name  # a path that must never reach the server
    context = _site(tmp_path, _write(secret, source, images, labels))
    reply = client_app(_message(CFG, BREAST), context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert not reply.content.array_records  # nothing trained, nothing leaves
    reason = refusal_reason(reply.content)  # the server's strategy reads it as a refusal, not an error
    assert reason == (f"site h2's data is {site_text}; the run's input is 1x28x28 grayscale, binary (breastmnist): "
                      f"they differ in {diff}")
    assert "patient" not in reason and str(tmp_path) not in reason
    metrics = dict(next(iter(reply.content.metric_records.values())))
    assert metrics == {"site-id": 1, "refused": 1.0}
    assert not (tmp_path / "h2" / "h2.ledger.sqlite").exists()
    # its evaluation fails with the same reason (an error reply, medfed.client.redaction), never a torch shape error
    from medfed.client.redaction import SiteFailure

    with pytest.raises(SiteFailure, match="^DataMismatch: site h2's data is .* they differ in"):
        client_app(_message(CFG, BREAST, kind="evaluate"), context)


def test_a_site_that_fits_trains_and_one_without_a_spec_is_an_error(tmp_path: Path, shared_data: Path) -> None:
    context = _site(tmp_path, _write(tmp_path / "h2" / "breastmnist.npz", shared_data / "breastmnist.npz"))
    reply = client_app(_message(CFG, BREAST), context)
    assert not reply.has_error() and reply.content.array_records
    bare = _message(CFG, BREAST)
    config = bare.content["config"]
    for key in INPUT_KEYS:
        del config[key]
    from medfed.client.redaction import SiteFailure

    with pytest.raises(SiteFailure, match="^ConfigError: the run config carries no input spec"):
        client_app(bare, context)
