"""Runner pieces without a simulation: arm settings, the Flower-runtime arm filter, publishing, scaling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.config import run_config
from medfed.data.medmnist import load_medmnist
from medfed.data.site import site_from_own_file
from medfed.exceptions import ConfigError
from medfed.experiment.arms import Arm, arm_config, arms_for
from medfed.experiment.run_dir import publish
from medfed.experiment.runner import arms_for_flower_runtime
from medfed.task.algo import SiteAlgo


def test_baselines_from_scratch_fine_tune_fully_and_keep_the_main_encoder() -> None:
    main = run_config(pretrain="mae", finetune_mode="linear")
    scratch = arm_config(main, Arm("federated", "none"))
    assert (scratch.model.encoder, scratch.finetune.mode, scratch.ssl.method) == ("vit", "full", "none")
    same = arm_config(main, Arm("centralized", "mae"))
    assert (same.model.encoder, same.finetune.mode) == ("vit", "linear")


def test_fedema_fedu_and_personal_parts_apply_to_the_federation_only_and_every_baseline_can_run() -> None:
    """The attack review: fedu with the default baselines used to fail after the main arm (the from-scratch arm
    kept fedu without byol); now every arm's settings are valid and say what it does."""
    main = run_config(pretrain="byol", ssl_aggregation="fedu", personal="norm+head", baselines="all")
    settings = {arm.name: arm_config(main, arm) for arm in arms_for(main)}
    assert set(settings) == {"federated-byol", "local-only-none", "federated-none", "centralized-byol",
                             "local-only-byol"}
    got = {name: (c.ssl.aggregation, c.federation.personal) for name, c in settings.items()}
    assert got == {"federated-byol": ("fedu", "norm+head"), "federated-none": ("fedavg", "norm+head"),
                   "local-only-none": ("fedavg", "none"), "centralized-byol": ("fedavg", "none"),
                   "local-only-byol": ("fedavg", "none")}


def test_the_server_step_applies_to_the_federated_pretraining_only_and_every_baseline_can_run() -> None:
    """The review of FedAvgM: with the server step kept, every baseline arm was refused (no federation or no
    pretraining), so `medfed simulate --pretrain-server-momentum 0.9` with its default baselines failed."""
    main = run_config(pretrain_server_lr=1.5, pretrain_server_momentum=0.9, baselines="all")
    settings = {arm.name: arm_config(main, arm) for arm in arms_for(main)}
    got = {name: (c.ssl.server_lr, c.ssl.server_momentum) for name, c in settings.items()}
    assert got == {"federated-simclr": (1.5, 0.9), "federated-none": (1.0, 0.0), "local-only-none": (1.0, 0.0),
                   "centralized-simclr": (1.0, 0.0), "local-only-simclr": (1.0, 0.0)}


def test_baselines_all_include_every_mode_with_the_same_pretraining() -> None:
    names = [a.name for a in arms_for(run_config(mode="centralized", pretrain="byol", baselines="all"))]
    assert names == ["centralized-byol", "local-only-none", "federated-none", "federated-byol", "local-only-byol"]


class FakeGrid:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(self.n))


def test_inside_a_flower_runtime_only_federated_arms_run() -> None:
    cfg = run_config(num_sites=3)
    kept = arms_for_flower_runtime(cfg, arms_for(cfg), FakeGrid(3))
    assert [a.name for a in kept] == ["federated-simclr", "federated-none"]
    with pytest.raises(ConfigError, match="only 2 SuperNodes are connected"):
        arms_for_flower_runtime(cfg, arms_for(cfg), FakeGrid(2))
    local = run_config(num_sites=3, mode="local-only")
    with pytest.raises(ConfigError, match="trains outside the federation"):
        arms_for_flower_runtime(local, arms_for(local), FakeGrid(3))


def test_publish_takes_the_next_free_name_if_another_run_took_it(tmp_path: Path) -> None:
    partial = tmp_path / ".run.partial-1"
    partial.mkdir()
    (partial / "report.md").write_text("mine")
    taken = tmp_path / "run"
    taken.mkdir()
    (taken / "report.md").write_text("theirs")
    final = publish(partial, taken)
    assert final == tmp_path / "run-2" and (final / "report.md").read_text() == "mine"
    assert (taken / "report.md").read_text() == "theirs"


def test_fedprox_term_only_in_federated_runs(shared_data: Path) -> None:
    site = site_from_own_file(load_medmnist(shared_data / "breastmnist.npz"), 0, 0.1, 0)
    fed = run_config(strategy="fedprox", proximal_mu=0.5)
    assert SiteAlgo(fed, site).proximal_mu == 0.5
    assert SiteAlgo(fed.replace(mode="centralized"), site).proximal_mu == 0.0
    assert SiteAlgo(fed.replace(mode="local-only"), site).proximal_mu == 0.0


def test_float_files_use_one_intensity_mapping_for_every_split_and_site(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n, top in (("train", 30, 100.0), ("val", 10, 400.0), ("test", 10, 50.0)):
        arrays[f"{split}_images"] = (rng.random((n, 16, 16)) * top - 20.0).astype(np.float32)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    path = tmp_path / "ct.npz"
    np.savez_compressed(path, **arrays)
    data = load_medmnist(path)
    low, high = float(arrays["train_images"].min()), float(arrays["train_images"].max())
    assert data.train.images.value_range == pytest.approx((low, high))
    site = site_from_own_file(data, 0, 1.0, 0)
    value = arrays["val_images"][0]  # val values above the train range clip to 1, others map linearly
    expected = np.clip((value - low) / (high - low), 0, 1)
    torch.testing.assert_close(site.val_images[0][0, 0], torch.as_tensor(expected), atol=1e-5, rtol=0)


def test_a_flower_run_records_its_run_directory_for_medfed_run(tmp_path: Path) -> None:
    from medfed.experiment.run_dir import FLOWER_RUNS, flower_run_dir, record_flower_run

    assert flower_run_dir(tmp_path, 42) is None  # nothing recorded (or the run died before it made its directory)
    record_flower_run(tmp_path, 42, tmp_path / ".r.partial")
    assert flower_run_dir(tmp_path, 42) == tmp_path / ".r.partial"
    record_flower_run(tmp_path, 42, tmp_path / "r")  # finished: the published directory replaces the partial one
    assert flower_run_dir(tmp_path, 42) == tmp_path / "r" and flower_run_dir(tmp_path, 43) is None
    (tmp_path / FLOWER_RUNS / "43.json").write_text("{not json")
    assert flower_run_dir(tmp_path, 43) is None


def test_the_flower_run_record_is_not_written_through_a_symlink(tmp_path: Path) -> None:
    from medfed.exceptions import ConfigError
    from medfed.experiment.run_dir import FLOWER_RUNS, record_flower_run

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / FLOWER_RUNS).symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="not a folder of this user's"):
        record_flower_run(tmp_path, 7, tmp_path / "r")
    assert list(elsewhere.iterdir()) == []
