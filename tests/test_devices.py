"""Devices: a setting resolved (or refused: a GPU asked for that is not there), where each part of a run computes,
bf16 autocast, what the run records; and, whenever a GPU is present, every phase on it (marked gpu)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medfed.cli import app
from medfed.config import RunConfig, run_config
from medfed.constants import MessageKey, NodeConfigKey
from medfed.data.site import SiteData
from medfed.data.transforms import AugmentSpec, augment, mask_patches
from medfed.devices import (
    describe_device,
    library_versions,
    resolve_device,
    to_device,
    use_bf16,
)
from medfed.exceptions import ConfigError
from medfed.experiment.run_dir import run_summary
from medfed.task.algo import SiteAlgo, logits_of
from medfed.task.model_setup import new_classifier, new_encoder
from medfed.task.site_round import read_message_config, site_device

HAS_CUDA = torch.cuda.is_available()


def small(**changes: object) -> RunConfig:
    return run_config(data="breastmnist", width=8, pretrain_batch_size=32, finetune_batch_size=16, pretrain_epochs=1,
                      finetune_epochs=1, **changes)


@pytest.fixture()
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ---- settings and resolution -----------------------------------------------------------


@pytest.mark.parametrize("bad", ["nvidia", "cuda:", "cuda:x", "CPU0", "cuda:123", "tpu", " cuda"])
def test_a_device_setting_other_than_auto_cpu_cuda_is_refused_by_the_config(bad: str) -> None:
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        run_config(device=bad)


def test_auto_is_the_cpu_without_a_gpu_and_cpu_is_always_the_cpu(no_gpu: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("asked", ["cuda", "cuda:0", "cuda:1"])
def test_a_gpu_asked_for_without_one_is_a_clear_error_not_a_silent_cpu_run(no_gpu: None, asked: str) -> None:
    with pytest.raises(ConfigError, match=rf"device {asked} asks for a GPU, but torch finds no CUDA device here"):
        resolve_device(asked)


def test_a_gpu_number_past_the_machine_s_gpus_is_refused_with_their_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"cuda:2: this machine has 2 CUDA device\(s\), numbered 0..1"):
        resolve_device("cuda:2")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU: the refusal is for machines without one")
def test_simulate_with_device_cuda_on_a_machine_without_a_gpu_exits_2_before_anything_is_written(
    tmp_path: Path, data_path_env: Path
) -> None:
    result = CliRunner().invoke(app, ["simulate", "--data", "breastmnist", "--device", "cuda", "--out-dir",
                                      str(tmp_path / "runs"), "--baselines", "none"])
    assert result.exit_code == 2, result.output
    assert "asks for a GPU, but torch finds no CUDA device" in result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_client_gpus_need_a_device_that_can_be_a_gpu_and_ray_picks_the_gpu() -> None:
    with pytest.raises(ConfigError, match="client-gpus 0.5 gives each simulated site a GPU share, but device is cpu"):
        run_config(device="cpu", client_gpus=0.5)
    with pytest.raises(ConfigError, match="Ray chooses each simulated site's GPU"):
        run_config(device="cuda:1", client_gpus=0.5)
    assert run_config(device="cuda", client_gpus=0.25).federation.client_gpus == 0.25
    with pytest.raises(ConfigError, match="client-gpus above 1 must be a whole number"):
        run_config(client_gpus=1.5)


# ---- who decides a site's device -------------------------------------------------------


def test_a_deployed_site_computes_where_its_own_node_config_says_never_where_the_server_says(no_gpu: None) -> None:
    own = {NodeConfigKey.DATA_PATH.value: "/site/data.csv", NodeConfigKey.DEVICE.value: "cpu"}
    # the server's message names a device (its own setting, and the simulation key): neither reaches the site
    message = {**RunConfig().site_settings(), "device": "cuda:0", MessageKey.DEVICE.value: "cuda"}
    cfg, extras = read_message_config(message)
    assert cfg.compute.device == "auto"  # a centre-only setting keeps its default at a site
    assert site_device(own, extras) == torch.device("cpu")
    assert site_device({NodeConfigKey.DATA_PATH.value: "/d.csv"}, extras) == torch.device("cpu")  # auto
    with pytest.raises(ConfigError, match=r"^this site's node config names a device this machine does not have "
                       r"\(details in the site's log\)$"):  # no library versions or GPU count to the server
        site_device({NodeConfigKey.DATA_PATH.value: "/d.csv", NodeConfigKey.DEVICE.value: "cuda"}, {})


def test_a_simulated_site_computes_on_the_run_s_device_which_the_message_carries(no_gpu: None) -> None:
    node = {NodeConfigKey.PARTITION_ID.value: 0}
    assert site_device(node, {MessageKey.DEVICE.value: "cpu"}) == torch.device("cpu")
    with pytest.raises(ConfigError, match="device cuda asks for a GPU"):
        site_device(node, {MessageKey.DEVICE.value: "cuda"})


# ---- precision -------------------------------------------------------------------------


def test_bf16_is_never_used_under_dp_and_auto_uses_it_only_on_a_gpu() -> None:
    cpu = torch.device("cpu")
    assert not use_bf16("auto", cpu, private=False)
    assert not use_bf16("fp32", cpu, private=False)
    assert use_bf16("bf16", cpu, private=False)
    assert not use_bf16("bf16", cpu, private=True)
    assert not use_bf16("auto", torch.device("cuda", 0), private=True)


def test_bf16_autocast_changes_a_round_s_numbers_a_little_and_fp32_is_the_default_on_the_cpu(
    breast_site: SiteData,
) -> None:
    def round_weights(precision: str) -> dict[str, torch.Tensor]:
        c = small(pretrain="none", precision=precision)
        start = new_classifier(c, breast_site.spec, breast_site.task, breast_site.num_classes, None).state_dict()
        out, stats = SiteAlgo(c, breast_site).finetune_round(start, 1)
        assert torch.isfinite(torch.tensor(stats.loss))
        return out

    auto, fp32, bf16 = round_weights("auto"), round_weights("fp32"), round_weights("bf16")
    assert all(torch.equal(auto[k], fp32[k]) for k in fp32)  # auto on the CPU is fp32
    assert all(v.dtype == torch.float32 for v in bf16.values())  # the weights stay fp32; only the forward is bf16
    diff = max(float((bf16[k] - fp32[k]).abs().max()) for k in fp32)
    assert 0 < diff < 0.05  # autocast really ran, and it moved the weights only a little


@pytest.mark.parametrize("method", ["simclr", "byol", "mae", "restore", "simclr+restore"])
def test_every_ssl_method_pretrains_under_bf16_autocast(breast_site: SiteData, method: str) -> None:
    """bf16 autocast (auto on a GPU) through every method's loss: dtypes must meet (MAE's mask tokens did not)."""
    c = small(pretrain=method, precision="bf16")
    enc, _, stats = SiteAlgo(c, breast_site).pretrain_round(new_encoder(c, breast_site.spec).state_dict(), None, 1)
    assert stats.steps > 0 and torch.isfinite(torch.tensor(stats.loss))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in enc.values() if v.is_floating_point())


# ---- what a run records, and the pieces that move data ---------------------------------


def test_the_run_summary_records_the_device_its_name_and_the_library_versions() -> None:
    summary = run_summary(run_config(device="cpu"), "run-1")
    compute = summary["compute"]
    assert compute["device"] == "cpu" and compute["precision"] == "auto" and compute["name"]
    assert compute["libraries"]["torch"] == torch.__version__.split("+")[0] or compute["libraries"]["torch"]
    assert set(compute["libraries"]) >= {"torch", "flwr", "opacus", "peft", "monai"}
    assert library_versions()["flwr"] == "1.42.0"
    assert describe_device(torch.device("cpu"))["device"] == "cpu"


def test_to_device_leaves_a_tensor_already_there_alone() -> None:
    x = torch.zeros(3)
    assert to_device(x, torch.device("cpu")) is x


# ---- every phase on a GPU, whenever one is present -------------------------------------


@pytest.mark.gpu
def test_augmentations_run_on_the_gpu_and_keep_shapes() -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in ((4, 1, 28, 28), (2, 1, 16, 16, 16)):
        x = torch.rand(shape, device="cuda")
        out = augment(x, AugmentSpec(), gen)
        masked, mask = mask_patches(out, 4, 0.3, gen)
        assert out.device.type == masked.device.type == mask.device.type == "cuda" and out.shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["simclr", "byol", "mae", "restore"])
def test_pretraining_rounds_run_on_the_gpu_and_release_cpu_weights(breast_site: SiteData, method: str) -> None:
    c = small(pretrain=method, device="cuda")
    algo = SiteAlgo(c, breast_site, device=torch.device("cuda"))
    enc, local, stats = algo.pretrain_round(new_encoder(c, breast_site.spec).state_dict(), None, 1)
    assert all(v.device.type == "cpu" for v in [*enc.values(), *local.values()])
    assert stats.steps > 0 and torch.isfinite(torch.tensor(stats.loss))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fine_tuning_and_evaluation_run_on_the_gpu(breast_site: SiteData, mode: str) -> None:
    c = small(pretrain="none", finetune_mode=mode)
    start = new_classifier(c, breast_site.spec, breast_site.task, breast_site.num_classes, None).state_dict()
    algo = SiteAlgo(c, breast_site, device=torch.device("cuda"))
    out, _ = algo.finetune_round(start, 1)
    assert all(v.device.type == "cpu" for v in out.values())
    metrics = algo.evaluate_val({**start, **out})
    assert 0 <= float(metrics["auc"]) <= 1
    model = algo.classifier({**start, **out})
    assert logits_of(model, breast_site.val_images).device.type == "cpu"


@pytest.mark.gpu
def test_a_dp_round_runs_on_the_gpu_with_its_noise_drawn_there(breast_site: SiteData, tmp_path: Path) -> None:
    from medfed.privacy.guard import PrivacyGuard, SitePrivacy

    c = small(pretrain="none", dp="finetune", dp_epsilon=8.0, finetune_rounds=2)
    guard = PrivacyGuard(SitePrivacy.resolve(c, "0", {}, tmp_path), "gpu-test")
    start = new_classifier(c, breast_site.spec, breast_site.task, breast_site.num_classes, None).state_dict()
    out, stats = SiteAlgo(c, breast_site, guard, torch.device("cuda")).finetune_round(start, 1)
    assert stats.privacy["epsilon"] > 0 and all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize(("device", "error"), [
    ("cuda", "site h2: node config device cuda asks for a GPU, but torch finds no CUDA device here"),
    ("gpu0", "device must be auto, cpu, cuda or cuda:N"),
])
def test_medfed_site_refuses_a_device_it_does_not_have_before_it_starts(
    tmp_path: Path, shared_data: Path, no_gpu: None, device: str, error: str
) -> None:
    from medfed.deploy.launch import site_node_config

    kit = tmp_path / "kit"
    kit.mkdir()
    toml = 'site-name = "h2"\nsite-id = 1\nledger-path = "l.sqlite"\nsigning-key = "k.pem"\n'
    (kit / "site.toml").write_text(toml + f'device = "{device}"\n')
    with pytest.raises(ConfigError, match=error):
        site_node_config(kit, str(shared_data / "breastmnist.npz"))
    (kit / "site.toml").write_text(toml + 'device = "cpu"\n')
    assert site_node_config(kit, str(shared_data / "breastmnist.npz"))["device"] == "cpu"
