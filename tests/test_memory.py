"""The pretraining batch is sized for the input: measured activation memory per case (pinned), the automatic
batch, and the refusal of an explicit batch that does not fit, naming what it needs and what to lower."""

from __future__ import annotations

import pytest

from medfed.config import run_config
from medfed.exceptions import ConfigError
from medfed.experiment.memory import HEADROOM, fit_pretrain_batch, measure_pretrain_memory, sites_at_once
from medfed.models.encoders import InputSpec

FLAT = InputSpec(1, (28, 28))
VOLUME = InputSpec(1, (64, 64, 64))


@pytest.mark.parametrize(("settings", "spec", "per_case"), [
    ({}, FLAT, 1496346.0),  # SimCLR, CNN width 16: two views' saved activations
    ({}, VOLUME, 134390746.0),  # 90x the 28x28 case: the 64^3 run that needed 20 GB at batch 128
    ({"pretrain": "mae"}, FLAT, 4382142.0),
    ({"pretrain": "byol"}, InputSpec(3, (28, 28)), 1714736.0),
])
def test_saved_activations_per_case_are_measured_on_the_runs_own_model(settings, spec, per_case) -> None:
    assert measure_pretrain_memory(run_config(**settings), spec).per_case == pytest.approx(per_case, rel=1e-6)


def test_the_automatic_batch_is_128_for_small_images_and_fits_the_memory_for_volumes() -> None:
    assert fit_pretrain_batch(run_config(pretrain_memory_gb=4.0), FLAT).ssl.batch_size == 128
    fitted = fit_pretrain_batch(run_config(pretrain_memory_gb=4.0), VOLUME)
    memory = measure_pretrain_memory(fitted, VOLUME)
    assert fitted.ssl.batch_size == memory.largest_batch() == 14
    assert memory.need(14) <= 4e9 < memory.need(15)
    assert memory.need(14) == pytest.approx(HEADROOM * 14 * 134390746.0 + memory.fixed)
    assert fit_pretrain_batch(run_config(pretrain="none", finetune_rounds=1), VOLUME).ssl.batch_size == 0


def test_a_batch_that_does_not_fit_is_refused_naming_the_need_and_the_settings() -> None:
    with pytest.raises(ConfigError) as info:
        fit_pretrain_batch(run_config(pretrain_memory_gb=8.0, pretrain_batch_size=128), VOLUME)
    said = str(info.value)
    assert "pretraining 128 cases of 64x64x64 per batch needs about 34.5 GB per site" in said
    assert "a site may use 8.0 GB" in said and "at most 29 fits" in said
    for setting in ("pretrain-batch-size", "image-size", "pretrain-memory-gb"):
        assert setting in said
    assert fit_pretrain_batch(run_config(pretrain_memory_gb=8.0, pretrain_batch_size=24), VOLUME).ssl.batch_size == 24
    with pytest.raises(ConfigError, match="pretraining 2 cases of 64x64x64 per batch"):
        fit_pretrain_batch(run_config(pretrain_memory_gb=0.3), VOLUME)


def test_sites_that_train_at_once_share_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert sites_at_once(run_config(num_sites=5)) == 1  # client-cpus 0: every core per site, one after another
    assert sites_at_once(run_config(num_sites=5, client_cpus=4)) == 4
    assert sites_at_once(run_config(num_sites=3, client_cpus=1)) == 3
