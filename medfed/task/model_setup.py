"""Building a run's models, seeded and Flower-free: the encoder, the classifier (with LoRA adapters under
``finetune-mode lora``), the encoder a run starts from (``encoder-init``), and which keys a site shares.

Every draw comes from a generator seeded by parts of the run (`derive_seed`): the same seed gives the same
weights on every machine, and the global RNG is never used (`seeded_init` forks it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from medfed.config import RunConfig
from medfed.constants import FinetuneMode, SSLAggregation, TaskType
from medfed.exceptions import ConfigError
from medfed.models.encoders import Encoder, InputSpec, build_encoder
from medfed.models.heads import Classifier
from medfed.models.lora import add_lora, is_lora_key
from medfed.selfsup.methods import SSLSettings
from medfed.selfsup.registry import resolve_encoder_kind

StateDict = dict[str, torch.Tensor]
_Built = TypeVar("_Built")


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (run seed, site, phase, round), same on every machine."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def seeded_init(seed: int, build: Callable[[], _Built]) -> _Built:
    """Build a module with weights drawn from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def new_encoder(cfg: RunConfig, spec: InputSpec) -> Encoder:
    kind = resolve_encoder_kind(cfg.model.encoder, cfg.ssl.methods)
    return seeded_init(
        derive_seed(cfg.experiment.seed, "encoder-init"), lambda: build_encoder(kind, spec, cfg.model.width)
    )


def new_classifier(
    cfg: RunConfig, spec: InputSpec, task: TaskType, num_classes: int, encoder_state: StateDict | None
) -> Classifier:
    """Classifier with the given (pretrained) encoder weights and a seeded fresh head; under
    ``finetune-mode lora`` the encoder then gets seeded LoRA adapters (its own weights frozen)."""
    model = seeded_init(
        derive_seed(cfg.experiment.seed, "classifier-init"),
        lambda: Classifier(new_encoder(cfg, spec), task, num_classes),
    )
    if encoder_state is not None:
        model.encoder.load_state_dict(encoder_state)
    if cfg.finetune.mode == FinetuneMode.LORA:
        seeded_init(
            derive_seed(cfg.experiment.seed, "lora-init"),
            lambda: add_lora(model.encoder, cfg.lora.rank, cfg.lora.alpha),
        )
    return model


def initial_encoder_state(cfg: RunConfig, spec: InputSpec) -> StateDict:
    """The encoder a run starts from: ``encoder-init`` when given (checked against the data), else a seeded
    fresh one."""
    fresh = new_encoder(cfg, spec).state_dict()
    if not cfg.model.encoder_init:
        return fresh
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(cfg.model.encoder_init).expanduser()
    if not path.is_file():
        raise ConfigError(f"encoder-init {str(path)!r} does not exist")
    try:
        loaded = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"encoder-init {str(path)!r} is not a readable safetensors file ({exc})") from exc
    for key, value in fresh.items():
        if key not in loaded or tuple(loaded[key].shape) != tuple(value.shape):
            raise ConfigError(
                f"encoder-init {str(path)!r} does not fit this encoder ({cfg.model.encoder}, width {cfg.model.width}, "
                f"input {spec.channels}x{'x'.join(map(str, spec.spatial_shape))}): {key!r} missing or of another shape"
            )
    extra = sorted(set(loaded) - set(fresh))
    if extra:
        raise ConfigError(f"encoder-init {str(path)!r} holds arrays this encoder lacks: {extra[:3]}")
    return {k: loaded[k] for k in fresh}


def initial_pretrain_state(cfg: RunConfig, spec: InputSpec, encoder_state: StateDict) -> StateDict:
    """The global arrays pretraining starts from: the encoder, and under ``ssl-aggregation fedu`` BYOL's predictor
    (seeded by the run, the same for every site) under `PREDICTOR_PREFIX`."""
    if cfg.ssl.aggregation != SSLAggregation.FEDU:
        return dict(encoder_state)
    from medfed.selfsup.federated import PREDICTOR_PREFIX, shared_predictor
    from medfed.selfsup.registry import build_method

    method = seeded_init(derive_seed(cfg.experiment.seed, "ssl-shared-predictor"),
                         lambda: build_method(cfg.ssl.methods, cfg.ssl.method_weights, new_encoder(cfg, spec),
                                              ssl_settings(cfg)))
    predictor = shared_predictor(method).state_dict()
    return {**encoder_state, **{PREDICTOR_PREFIX + k: v.detach().clone() for k, v in predictor.items()}}


def check_loss_fits_task(cfg: RunConfig, task: TaskType) -> None:
    if cfg.finetune.loss == "logit-adjusted" and task == TaskType.MULTILABEL:
        raise ConfigError("finetune-loss logit-adjusted needs a single-label task; this data is multi-label")


def ssl_settings(cfg: RunConfig) -> SSLSettings:
    return SSLSettings(
        temperature=cfg.ssl.temperature, byol_momentum=cfg.ssl.byol_momentum, mask_ratio=cfg.ssl.mask_ratio
    )


def finetune_shared_keys(cfg: RunConfig, classifier_keys: list[str]) -> list[str]:
    """Keys a site sends after fine-tuning: the head for a linear probe, the adapters and the
    head under LoRA, else everything."""
    if cfg.finetune.mode == FinetuneMode.LINEAR:
        return [k for k in classifier_keys if k.startswith("head.")]
    if cfg.finetune.mode == FinetuneMode.LORA:
        return [k for k in classifier_keys if k.startswith("head.") or is_lora_key(k)]
    return list(classifier_keys)


# ---- the loop -----------------------------------------------------------------------
