"""How much memory a site's pretraining needs, measured on the run's own model, and the batch that fits.

A 64^3 volume costs the default CNN some 134 MB of activations kept for the backward pass (SimCLR, two views),
so the 2D default of 128 cases per batch would need tens of GB. Before anything is written, the centre measures what one
case costs: it runs the run's self-supervised loss on two cases of the run's input with
`torch.autograd.graph.saved_tensors_hooks` counting every tensor autograd keeps for the backward pass (distinct
storages only), which is the memory that grows with the batch. ``pretrain-batch-size 0`` (the default) becomes
`AUTO_PRETRAIN_BATCH` or the largest batch whose `HEADROOM` times that fits ``pretrain-memory-gb`` (default: a
fifth of this machine's memory, shared by the sites that train at once); an explicit batch that does not fit is
refused, naming what it needs and the settings to lower. The chosen batch is part of the run's settings, sent to
every site and recorded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch

from medfed.config import RunConfig
from medfed.config.training import AUTO_PRETRAIN_BATCH
from medfed.exceptions import ConfigError
from medfed.models.encoders import InputSpec
from medfed.selfsup.registry import build_method
from medfed.task.model_setup import new_encoder, ssl_settings

HEADROOM = 2.0
"""Peak over the saved activations: the backward pass's gradient buffers, the batch's augmented views and the
allocator's slack. Measured on the 64^3 benchmark (docs/RESULTS.md `volume_run`): a site's process peaked at about
1.7x its saved-activation bytes at a batch of 30."""
MACHINE_SHARE = 0.2
"""Share of this machine's memory the sites training at once may fill by default: the rest holds the Flower and Ray
processes, the centre's evaluation and the other phases' models (the 64^3 benchmark measures the whole process
tree against issue 14's 8 GB target)."""
PROBE_CASES = 2
GB = 1e9


@dataclass(frozen=True)
class PretrainMemory:
    """What one site's pretraining batch costs: ``per_case`` bytes of saved activations per case, ``fixed`` bytes of
    weights, gradients and optimiser state; ``limit`` the bytes one site may use."""

    per_case: float
    fixed: float
    limit: float

    def need(self, batch: int) -> float:
        return HEADROOM * batch * self.per_case + self.fixed

    def largest_batch(self) -> int:
        return max(0, int((self.limit - self.fixed) / (HEADROOM * self.per_case)))


def sites_at_once(cfg: RunConfig) -> int:
    """Simulated sites that train at the same time on this machine (Flower's Ray backend: cores / client-cpus)."""
    cores = os.cpu_count() or 1
    per_site = cfg.federation.client_cpus or cores
    return max(1, min(cfg.dataset.num_sites, cores // max(1, per_site)))


def measure_pretrain_memory(cfg: RunConfig, spec: InputSpec) -> PretrainMemory:
    """Saved-activation bytes per case of the run's SSL loss (measured on `PROBE_CASES` cases) and the limit."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.random.fork_rng():  # the run's own random streams are left as they were
        torch.manual_seed(0)
        encoder = new_encoder(cfg, spec)
        method = build_method(cfg.ssl.methods, cfg.ssl.method_weights, encoder, ssl_settings(cfg))
        method.train()
        images = torch.rand((PROBE_CASES, spec.channels, *spec.spatial_shape))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            method.loss(images, torch.Generator().manual_seed(0))
    weights = sum(p.numel() * p.element_size() for p in method.parameters())
    limit = (cfg.ssl.memory_gb * GB if cfg.ssl.memory_gb
             else MACHINE_SHARE * psutil.virtual_memory().total / sites_at_once(cfg))
    return PretrainMemory(sum(storages.values()) / PROBE_CASES, 4.0 * weights, limit)


def fit_pretrain_batch(cfg: RunConfig, spec: InputSpec) -> RunConfig:
    """``cfg`` with its pretraining batch decided: auto (0) becomes the largest batch up to `AUTO_PRETRAIN_BATCH`
    that fits; an explicit batch is kept if it fits.

    Raises:
        ConfigError: an explicit batch that does not fit, or no batch of 2 fitting, naming what it needs.
    """
    if not cfg.ssl.methods:
        return cfg
    memory = measure_pretrain_memory(cfg, spec)
    shape = "x".join(str(s) for s in spec.spatial_shape)
    fits = memory.largest_batch()
    if cfg.ssl.batch_size == 0:
        batch = min(AUTO_PRETRAIN_BATCH, fits)
        if batch >= 2:
            return cfg.replace(pretrain_batch_size=batch)
        wanted = 2
    else:
        if memory.need(cfg.ssl.batch_size) <= memory.limit:
            return cfg
        wanted = cfg.ssl.batch_size
    raise ConfigError(
        f"pretraining {wanted} cases of {shape} per batch needs about {memory.need(wanted) / GB:.1f} GB per site "
        f"({memory.per_case / 1e6:.0f} MB of activations per case); a site may use {memory.limit / GB:.1f} GB "
        f"(pretrain-memory-gb, or a fifth of this machine's memory over {sites_at_once(cfg)} site(s) at once). Lower "
        f"pretrain-batch-size (at most {fits} fits{'' if cfg.ssl.batch_size else '; 0 chooses it'}), image-size, or "
        "width, or give more memory (pretrain-memory-gb, client-cpus)")
