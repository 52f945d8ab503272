"""A deployed site trains on its own labels table (`medfed site --data labels.csv`): its cases are prepared to
the run's input with the run's image settings, into the site's own cache; data that do not fit the run are
refused before training, naming both inputs and nothing of the site's files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_metadata
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from medfed.client.redaction import SiteFailure
from medfed.client_app import app as client_app
from medfed.config import RunConfig, run_config
from medfed.constants import MessageKey, TaskType
from medfed.data.spec import DataSpec
from medfed.deploy.launch import site_node_config
from medfed.exceptions import DataError
from medfed.models.encoders import InputSpec
from medfed.strategies.shared_weights import refusal_reason
from medfed.task.model_setup import new_classifier
from tests.imaging_fixtures import medmnist_images, write_nifti, write_png

SECRET = "patient-0042-mrn-991"  # a folder name that must never reach the server
CFG = run_config(data="breastmnist", pretrain="none", width=8, finetune_batch_size=16, finetune_rounds=2,
                 site_data="own", loader_workers=0)
BREAST = DataSpec(1, (28, 28), TaskType.BINARY, 2, "breastmnist")


def png_table(root: Path, *, rgb: bool = False, classes: int = 2, n: int = 30) -> Path:
    """Real BreastMNIST images as PNGs (grayscale or RGB) with a labels table; labels cycle 0..classes-1."""
    folder = root / SECRET
    (folder / "img").mkdir(parents=True)
    rows = ["image,label,split"]
    for i, image in enumerate(medmnist_images("breastmnist", count=n)):
        write_png(np.repeat(image[..., None], 3, axis=-1) if rgb else image, folder / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{i % classes},{('train', 'train', 'val', 'test')[i % 4]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def nifti_table(root: Path) -> Path:
    folder = root / SECRET
    folder.mkdir(parents=True)
    rows = ["image,label"]
    for i, volume in enumerate(medmnist_images("adrenalmnist3d", count=12)):
        write_nifti(volume, folder / f"{i}.nii.gz")
        rows.append(f"{i}.nii.gz,{i % 2}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def context(tmp_path: Path, table: Path) -> Context:
    node_config = {"data-path": str(table), "site-id": 1, "site-name": "h2", "cache-dir": str(tmp_path / "cache"),
                   "ledger-path": str(tmp_path / "h2" / "h2.ledger.sqlite"),
                   "signing-key": str(tmp_path / "h2" / "ledger.ed25519.pem")}
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def message(cfg: RunConfig, run: DataSpec) -> Message:
    state = new_classifier(cfg, InputSpec(run.channels, run.spatial_shape), run.task, run.num_classes,
                           None).state_dict()
    config = ConfigRecord({**cfg.site_settings(), "phase": "finetune", "server-round": 1,
                           MessageKey.RUN_ID.value: "deploy-1/federated-none", **run.to_flat()})
    return Message(RecordDict({"arrays": ArrayRecord(state), "config": config}),
                   metadata=make_metadata(dst_node_id=5, message_type="train"))


def test_a_site_trains_on_its_own_table_prepared_to_the_runs_input(tmp_path: Path) -> None:
    table = png_table(tmp_path)
    reply = client_app(message(CFG, BREAST), context(tmp_path, table))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content.array_records  # trained and released its weights
    metrics = dict(next(iter(reply.content.metric_records.values())))
    assert metrics["num-examples"] == 2  # label-fraction 0.1 of the table's 15 train rows
    entries = list((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 30 and all(np.load(p).shape == (1, 28, 28) for p in entries[:3])
    # a run at 32x32 prepares the same table to 32x32 (another cache folder), and trains
    wide = DataSpec(1, (32, 32), TaskType.BINARY, 2, "wide")
    reply = client_app(message(CFG, wide), context(tmp_path, table))
    assert not reply.has_error() and reply.content.array_records
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 60


@pytest.mark.parametrize(("build", "site_text", "diff"), [
    (lambda root: png_table(root, rgb=True), "3x28x28 RGB, binary", "channels"),
    (nifti_table, "1x64x64x64 grayscale 3D, binary", "image dimensions (2D/3D)"),
], ids=["rgb", "3d"])
def test_a_site_whose_table_does_not_fit_refuses_naming_both_inputs(tmp_path: Path, build, site_text: str,
                                                                    diff: str) -> None:
    reply = client_app(message(CFG, BREAST), context(tmp_path, build(tmp_path)))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert not reply.content.array_records
    reason = refusal_reason(reply.content)
    assert reason == (f"site h2's data is {site_text}; the run's input is 1x28x28 grayscale, binary (breastmnist): "
                      f"they differ in {diff}")
    assert SECRET not in reason and str(tmp_path) not in reason


def test_a_site_whose_labels_reach_past_the_runs_classes_fails_naming_the_row(tmp_path: Path) -> None:
    with pytest.raises(SiteFailure) as failure:  # Flower's runtime turns it into the error reply: nothing released
        client_app(message(CFG, BREAST), context(tmp_path, png_table(tmp_path, classes=3)))
    reason = str(failure.value)
    assert "row 4: label 2 is outside the 2 classes (0..1)" in reason
    assert SECRET not in reason and str(tmp_path) not in reason and "labels.csv" not in reason


def test_medfed_site_checks_its_table_before_it_starts(tmp_path: Path) -> None:
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "site.toml").write_text('site-name = "h2"\nsite-id = 1\nledger-path = "ledger/h2.sqlite"\n'
                                   'signing-key = "ledger.pem"\ncache-dir = "cache"\n')
    table = png_table(tmp_path)
    config = site_node_config(kit, str(table))
    assert config["data-path"] == str(table) and config["cache-dir"] == str(kit / "cache")
    (table.parent / "bad.csv").write_text("image,label\nimg/0.png,0\nimg/0.png,0\n")
    with pytest.raises(DataError, match="site h2: labels table 'bad.csv' row 3: the same row as row 2"):
        site_node_config(kit, str(table.parent / "bad.csv"))


def test_medfed_site_accepts_a_table_lacking_a_class_or_holding_one_only(tmp_path: Path) -> None:
    """A hospital may hold positives only: the run's classes, not the site's table, say how many there are."""
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "site.toml").write_text('site-name = "h2"\nsite-id = 1\nledger-path = "l.sqlite"\nsigning-key = "k.pem"\n')
    table = png_table(tmp_path, classes=1)
    assert site_node_config(kit, str(table))["data-path"] == str(table)
    (table.parent / "gap.csv").write_text("image,label\nimg/0.png,0\nimg/1.png,2\n")
    assert site_node_config(kit, str(table.parent / "gap.csv"))["data-path"].endswith("gap.csv")
