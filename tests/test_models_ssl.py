"""Encoders, heads and self-supervised methods (medfed.models, medfed.selfsup)."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from medfed.constants import EncoderKind, SSLMethodName, TaskType
from medfed.exceptions import ConfigError
from medfed.models.encoders import CNNEncoder, InputSpec, ViTEncoder, ViTSize, vit_patch_size
from medfed.models.heads import Classifier, RestorationDecoder
from medfed.selfsup.methods import BYOL, MAE, Combined, Restore, SimCLR, SSLSettings
from medfed.selfsup.registry import available_methods, build_method, method_class, resolve_encoder_kind

pytestmark = pytest.mark.usefixtures("single_torch_thread")

SMALL_VIT = ViTSize(
    hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2,
    decoder_hidden_size=24, decoder_mlp_dim=24, decoder_num_layers=1, decoder_num_heads=2,
)
SETTINGS = SSLSettings(projection_dim=16, byol_momentum=0.9)

GRAY2D = InputSpec(1, (28, 28))
RGB2D = InputSpec(3, (28, 28))
VOL3D = InputSpec(1, (16, 16, 16))


def cnn(spec: InputSpec = GRAY2D) -> CNNEncoder:
    torch.manual_seed(0)
    return CNNEncoder(spec, width=8)


def vit(spec: InputSpec = GRAY2D) -> ViTEncoder:
    torch.manual_seed(0)
    return ViTEncoder(spec, SMALL_VIT)


def batch(spec: InputSpec, b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand((b, spec.channels, *spec.spatial_shape), generator=torch.Generator().manual_seed(seed))


def build(name: str, spec: InputSpec = GRAY2D):
    encoder = vit(spec) if name == "mae" else cnn(spec)
    return build_method([name], [1.0], encoder, SETTINGS)


# ---------------------------------------------------------------- encoders
@pytest.mark.parametrize(
    "spec, feature_dim, stages",
    [(GRAY2D, 64, 3), (RGB2D, 64, 3), (VOL3D, 32, 2), (InputSpec(1, (64, 64)), 128, 4)],
)
def test_cnn_encoder_output(spec, feature_dim, stages):
    enc = cnn(spec)
    assert enc.feature_dim == feature_dim and enc.stages == stages
    x = batch(spec, 3)
    out = enc(x)
    assert out.shape == (3, feature_dim)
    assert torch.isfinite(out).all()
    fmap = enc.forward_features(x)
    assert fmap.shape[:2] == (3, feature_dim)
    assert all(s == math.ceil(n / 2**stages) for s, n in zip(fmap.shape[2:], spec.spatial_shape, strict=True))


@pytest.mark.parametrize("spec, patch, tokens", [(GRAY2D, 4, 49), (RGB2D, 4, 49), (VOL3D, 8, 8)])
def test_vit_encoder_output(spec, patch, tokens):
    enc = vit(spec)
    assert vit_patch_size(spec) == patch
    x = batch(spec, 3)
    out = enc(x)
    assert out.shape == (3, SMALL_VIT.hidden_size) and enc.feature_dim == SMALL_VIT.hidden_size
    assert enc.forward_tokens(x).shape == (3, 1 + tokens, SMALL_VIT.hidden_size)
    torch.testing.assert_close(out, enc.forward_tokens(x)[:, 1:].mean(1))


def test_encoders_mix_samples_not():
    """Features of one image do not depend on the rest of the batch (no batch statistics)."""
    x = batch(GRAY2D, 4)
    for enc in (cnn(), vit()):
        enc.train()
        torch.testing.assert_close(enc(x)[:1], enc(x[:1]), atol=1e-5, rtol=1e-5)


def test_vit_patch_size_rejects_odd_shapes():
    with pytest.raises(ConfigError, match="patch size"):
        vit_patch_size(InputSpec(1, (27, 27)))


def test_cnn_rejects_1d():
    with pytest.raises(ConfigError, match="2D or 3D"):
        CNNEncoder(InputSpec(1, (28,)))


# ---------------------------------------------------------------- DP-SGD readiness
def _all_models():
    cls_cnn = Classifier(cnn(), TaskType.BINARY, 2)
    return {
        "classifier-cnn": cls_cnn,
        "classifier-vit": Classifier(vit(), TaskType.MULTICLASS, 5),
        "simclr": build("simclr"),
        "byol": build("byol"),
        "mae": build("mae"),
        "restore": build("restore"),
        "restore-3d": build("restore", VOL3D),
        "combined": build_method(["byol", "restore"], [1.0, 1.0], cnn(), SETTINGS),
    }


def test_no_batchnorm_anywhere():
    for name, model in _all_models().items():
        kinds = [type(m) for m in model.modules()]
        assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds), name
        assert any(issubclass(k, (nn.GroupNorm, nn.LayerNorm)) for k in kinds), name


@pytest.mark.parametrize(
    "name", ["classifier-cnn", "classifier-vit", "simclr", "byol", "mae", "restore", "restore-3d", "combined"]
)
def test_opacus_validator_accepts(name):
    model = _all_models()[name]
    assert ModuleValidator.validate(model, strict=False) == []


def test_opacus_validator_would_catch_batchnorm():
    # guards the test above: the validator does flag BatchNorm
    assert ModuleValidator.validate(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), strict=False) != []


# ---------------------------------------------------------------- classifier and decoder
def test_classifier_shapes_and_losses():
    model = Classifier(cnn(RGB2D), TaskType.MULTICLASS, 5)
    x = batch(RGB2D, 3)
    logits = model(x)
    assert logits.shape == (3, 5)
    probs = model.probabilities(logits)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    labels = torch.tensor([[0], [4], [2]])
    torch.testing.assert_close(model.loss(logits, labels), nn.functional.cross_entropy(logits, labels[:, 0]))
    ml = Classifier(cnn(), TaskType.MULTILABEL, 3)
    lg = ml(batch(GRAY2D, 2))
    y = torch.tensor([[1, 0, 1], [0, 0, 1]])
    torch.testing.assert_close(ml.loss(lg, y), nn.functional.binary_cross_entropy_with_logits(lg, y.float()))
    torch.testing.assert_close(ml.probabilities(lg), torch.sigmoid(lg))


@pytest.mark.parametrize("spec", [GRAY2D, RGB2D, VOL3D, InputSpec(1, (30, 30))])
def test_restoration_decoder_restores_input_shape(spec):
    enc = cnn(spec)
    dec = RestorationDecoder(enc)
    x = batch(spec, 2)
    assert dec(enc.forward_features(x)).shape == x.shape


# ---------------------------------------------------------------- registry
def test_registry():
    assert available_methods() == ["byol", "mae", "restore", "simclr"]
    assert method_class("simclr") is SimCLR and method_class("mae") is MAE
    with pytest.raises(ConfigError, match="unknown self-supervised method 'dino'") as err:
        method_class("dino")
    assert "byol, mae, restore, simclr" in str(err.value)
    with pytest.raises(ConfigError, match="unknown self-supervised method"):
        build_method(["simclr", "moco"], [1.0, 1.0], cnn(), SETTINGS)
    with pytest.raises(ConfigError, match="no self-supervised method"):
        build_method([], [], cnn(), SETTINGS)
    assert isinstance(build_method(["byol", "restore"], [1.0, 0.5], cnn(), SETTINGS), Combined)


def test_per_example_flags_and_dp_support():
    assert SimCLR.per_example_loss is False
    assert BYOL.per_example_loss is True
    assert MAE.per_example_loss is True
    assert Restore.per_example_loss is True
    assert sorted(m.value for m in SSLMethodName) == available_methods()  # the enum and the registry agree
    combined = build_method(["byol", "restore"], [1.0, 1.0], cnn(), SETTINGS)
    assert combined.per_example_loss is True
    assert build_method(["byol", "simclr"], [1.0, 1.0], cnn(), SETTINGS).per_example_loss is False


def test_encoder_kind_resolution():
    assert resolve_encoder_kind("auto", ["mae"]) == EncoderKind.VIT
    assert resolve_encoder_kind("auto", ["simclr", "restore"]) == EncoderKind.CNN
    with pytest.raises(ConfigError, match="'restore' needs a cnn encoder"):
        resolve_encoder_kind("vit", ["restore"])
    with pytest.raises(ConfigError, match="'mae' needs a vit encoder"):
        resolve_encoder_kind("cnn", ["mae"])
    with pytest.raises(TypeError):
        MAE(cnn(), SETTINGS)
    with pytest.raises(TypeError):
        Restore(vit(), SETTINGS)


# ---------------------------------------------------------------- losses run and train
@pytest.mark.parametrize(
    "name, spec, low, high",
    [
        ("simclr", GRAY2D, 0.0, None),
        ("simclr", RGB2D, 0.0, None),
        ("byol", GRAY2D, 0.0, 4.0),
        ("byol", VOL3D, 0.0, 4.0),
        ("restore", GRAY2D, 0.0, 1.0),
        ("restore", VOL3D, 0.0, 1.0),
        ("mae", GRAY2D, 0.0, None),
        ("mae", VOL3D, 0.0, None),
    ],
)
def test_loss_finite_and_backward(name, spec, low, high):
    method = build(name, spec)
    x = batch(spec, 4)
    loss = method.loss(x, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() > low and (high is None or loss.item() <= high)
    loss.backward()
    enc_grads = [p.grad for p in method.encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in enc_grads)
    local = [p for n, p in method.named_parameters() if not n.startswith("encoder.") and p.requires_grad]
    assert local and any(p.grad is not None and p.grad.abs().sum() > 0 for p in local)
    if name == "byol":
        assert all(p.grad is None for p in method.target_encoder.parameters())
    # same generator state, same loss
    again = method.loss(x, torch.Generator().manual_seed(0))
    assert again.item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)


def test_simclr_loss_near_chance_at_init_scale():
    # with 2B = 8 views NT-Xent is bounded below by 0 and near log(7) for uninformative projections
    method = build("simclr")
    loss = method.loss(batch(GRAY2D, 4), torch.Generator().manual_seed(0)).item()
    assert 0.5 * math.log(7) < loss < 2 * math.log(7) + 1


def test_training_step_lowers_restore_loss():
    torch.manual_seed(0)
    method = build("restore")
    x = batch(GRAY2D, 4)
    opt = torch.optim.Adam(method.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):  # the same corruption every step: plain optimisation of one objective
        opt.zero_grad()
        loss = method.loss(x, torch.Generator().manual_seed(0))
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0]


# ---------------------------------------------------------------- site-local state
EXPECTED_LOCAL = {
    "simclr": {"projector"},
    "byol": {"projector", "predictor", "target_encoder", "target_projector"},
    "mae": {"decoder_embed", "mask_tokens", "decoder_pos_embedding", "decoder_blocks", "decoder_pred"},
    "restore": {"decoder"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_LOCAL))
def test_local_state_dict_holds_heads_not_encoder(name):
    method = build(name)
    local = method.local_state_dict()
    full = method.state_dict(keep_vars=True)
    enc_state = method.encoder.state_dict(keep_vars=True)
    assert not any(k.startswith("encoder.") for k in local)
    assert {k.split(".")[0] for k in local} == EXPECTED_LOCAL[name]
    assert set(local) == {k for k in full if not k.startswith("encoder.")}
    enc_ptrs = {t.data_ptr() for t in enc_state.values()}
    for key, value in local.items():
        assert value.data_ptr() not in enc_ptrs, key  # not a view of an encoder tensor
        assert value.data_ptr() != full[key].data_ptr(), key  # a copy, not the live tensor
        assert not value.requires_grad
        torch.testing.assert_close(value, full[key].detach())
    if name == "mae":
        assert "decoder_pred.weight" in local
    if name == "restore":
        assert any(k.startswith("decoder.net.") for k in local)
    if name == "byol":
        # the momentum target is a copy of the encoder, kept at the site
        assert {f"target_encoder.{k}" for k in enc_state} <= set(local)


def test_local_state_round_trip_and_key_check():
    method = build("byol")
    saved = method.local_state_dict()
    with torch.no_grad():
        method.predictor[0].weight.add_(1.0)
        method.encoder.features[0].conv.weight.add_(1.0)
    enc_after = method.encoder.features[0].conv.weight.detach().clone()
    method.load_local_state_dict(saved)
    torch.testing.assert_close(method.predictor[0].weight.detach(), saved["predictor.0.weight"])
    torch.testing.assert_close(method.encoder.features[0].conv.weight.detach(), enc_after)  # encoder untouched
    broken = dict(saved)
    broken.pop("predictor.0.weight")
    broken["encoder.features.0.conv.weight"] = enc_after
    with pytest.raises(ValueError, match="site-local state keys differ"):
        method.load_local_state_dict(broken)


def test_combined_local_state_excludes_shared_encoder_under_every_name():
    combined = build_method(["byol", "restore"], [1.0, 1.0], cnn(), SETTINGS)
    full = combined.state_dict(keep_vars=True)
    assert any(k.startswith("parts.0.encoder.") for k in full)  # the encoder appears under several names
    local = combined.local_state_dict()
    assert not any(".encoder." in f".{k}" for k in local)
    assert any(k.startswith("parts.0.target_encoder.") for k in local)
    assert any(k.startswith("parts.1.decoder.") for k in local)


# ---------------------------------------------------------------- BYOL momentum
def test_byol_target_starts_as_copy_and_moves_by_ema():
    method = build("byol")
    online = method.encoder.features[0].conv.weight
    target = method.target_encoder.features[0].conv.weight
    assert online is not target
    torch.testing.assert_close(online.detach(), target.detach())
    with torch.no_grad():
        online.add_(torch.randn(online.shape, generator=torch.Generator().manual_seed(1)))
        method.projector[0].bias.fill_(2.0)
        method.target_projector[0].bias.fill_(-1.0)
    po, pt = online.detach().clone(), target.detach().clone()
    method.on_step_end()
    m = SETTINGS.byol_momentum
    torch.testing.assert_close(target.detach(), m * pt + (1 - m) * po, atol=1e-7, rtol=0)
    torch.testing.assert_close(online.detach(), po)  # online weights unchanged
    bias = method.target_projector[0].bias.detach()
    torch.testing.assert_close(bias, torch.full_like(bias, m * -1.0 + (1 - m) * 2.0))  # 0.9*-1 + 0.1*2 = -0.7
    assert not any(p.requires_grad for p in method.target_encoder.parameters())


def test_combined_on_step_end_reaches_byol():
    encoder = cnn()
    combined = build_method(["byol", "restore"], [1.0, 1.0], encoder, SETTINGS)
    byol = combined.parts[0]
    with torch.no_grad():
        encoder.features[0].conv.weight.add_(1.0)
    before = byol.target_encoder.features[0].conv.weight.detach().clone()
    combined.on_step_end()
    m = SETTINGS.byol_momentum
    expected = m * before + (1 - m) * encoder.features[0].conv.weight.detach()
    torch.testing.assert_close(byol.target_encoder.features[0].conv.weight.detach(), expected)


# ---------------------------------------------------------------- combined loss
@pytest.mark.parametrize(
    "names, weights, kind",
    [(["byol", "restore"], [1.0, 0.5], "cnn"), (["simclr", "restore"], [0.3, 2.0], "cnn"),
     (["simclr", "mae"], [1.0, 0.7], "vit")],
)
def test_combined_is_weighted_sum(names, weights, kind):
    encoder = vit() if kind == "vit" else cnn()
    combined = build_method(names, weights, encoder, SETTINGS)
    x = batch(GRAY2D, 4)
    total = combined.loss(x, torch.Generator().manual_seed(123))
    gen = torch.Generator().manual_seed(123)
    parts = [part.loss(x, gen) for part in combined.parts]
    expected = sum(w * p for w, p in zip(weights, parts, strict=True))
    assert total.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert parts[0].item() != pytest.approx(parts[1].item())


def test_combined_zero_weight_part_is_skipped():
    encoder = cnn()
    combined = build_method(["byol", "restore"], [0.0, 1.0], encoder, SETTINGS)
    x = batch(GRAY2D, 4)
    total = combined.loss(x, torch.Generator().manual_seed(5))
    alone = combined.parts[1].loss(x, torch.Generator().manual_seed(5))  # byol draws nothing
    assert total.item() == pytest.approx(alone.item(), rel=1e-6)


def test_combined_requires_shared_encoder():
    with pytest.raises(ValueError, match="share the same encoder"):
        Combined(cnn(), [BYOL(cnn(), SETTINGS)], [1.0])
