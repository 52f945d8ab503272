"""medfed's latency tuning of Flower's deployment runtime (`medfed.flower_patches.flower_tuning`)."""

from __future__ import annotations

import sys
import time

import pytest

from medfed.flower_patches import flower_tuning


@pytest.fixture()
def restore_flower():
    """Undo the tuning after each test (it changes Flower's module state in this process)."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal

    fns = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(fn.__kwdefaults__) for fn in fns]
    saved_time = start_client_internal.time
    yield
    for fn, kw in zip(fns, saved, strict=True):
        fn.__kwdefaults__.clear()
        fn.__kwdefaults__.update(kw)
    start_client_internal.time = saved_time


def _pull_after_failures(failures: int) -> float:
    """Seconds Flower's pull_objects takes for one object that is unavailable ``failures`` times."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    tries = {"n": 0}

    def pull(object_id: str) -> bytes:
        tries["n"] += 1
        if tries["n"] <= failures:
            raise ObjectUnavailableError(object_id)
        return b"content"

    start = time.monotonic()
    assert pull_objects(["obj"], pull) == {"obj": b"content"}
    return time.monotonic() - start


def test_flowers_default_backoff_is_what_the_tuning_is_for() -> None:
    """Flower's own constants, and the live defaults (the module-level ServerApp, which a simulation test
    runs in-process, tunes them only while it runs)."""
    from flwr.supercore import constant
    from flwr.supercore.inflatable import inflatable_utils

    assert constant.PULL_INITIAL_BACKOFF == 1 and constant.PULL_BACKOFF_CAP == 10  # flwr 1.41-1.42
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == constant.PULL_INITIAL_BACKOFF


def test_tuned_pulls_retry_an_unavailable_object_within_a_fraction_of_a_second(restore_flower) -> None:
    flower_tuning.tune_object_pulls()
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        assert fn.__kwdefaults__["initial_backoff"] == 0.05 and fn.__kwdefaults__["backoff_cap"] == 0.5
    # three misses: 0.05 + 0.1 + 0.2 s (+-20 % jitter) instead of Flower's 1 + 2 + 4 s
    assert _pull_after_failures(3) < 1.0


def test_a_servers_tuning_ends_with_its_block(restore_flower) -> None:
    """The ServerApp tunes pulls only while it runs: afterwards the process has Flower's values back."""
    from flwr.supercore.inflatable import inflatable_utils

    fns = (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree)
    before = [(fn.__kwdefaults__["initial_backoff"], fn.__kwdefaults__["backoff_cap"]) for fn in fns]
    with flower_tuning.object_pulls_tuned():
        assert all(fn.__kwdefaults__["initial_backoff"] == 0.05 for fn in fns)
    assert [(fn.__kwdefaults__["initial_backoff"], fn.__kwdefaults__["backoff_cap"]) for fn in fns] == before
    with pytest.raises(KeyError), flower_tuning.object_pulls_tuned():
        raise KeyError("the run failed")
    assert [(fn.__kwdefaults__["initial_backoff"], fn.__kwdefaults__["backoff_cap"]) for fn in fns] == before


@pytest.mark.parametrize("initial,cap", [(0, 1), (-1, 1), (2, 1)])
def test_tune_object_pulls_refuses_bad_backoffs(restore_flower, initial, cap) -> None:
    with pytest.raises(ValueError, match="0 < initial_backoff <= backoff_cap"):
        flower_tuning.tune_object_pulls(initial, cap)


def test_capped_sleep_caps_only_sleep(monkeypatch) -> None:
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    capped = flower_tuning.CappedSleep(0.5)
    capped.sleep(3)
    capped.sleep(0.2)
    assert slept == [0.5, 0.2]
    assert capped.monotonic is time.monotonic


def test_the_supernode_loop_sleeps_at_most_the_cap(restore_flower) -> None:
    from flwr.supernode import start_client_internal

    assert start_client_internal.time is time  # flwr 1.41-1.42: `import time`, `time.sleep(3)` when idle
    flower_tuning.tune_supernode_polling(0.25)
    assert isinstance(start_client_internal.time, flower_tuning.CappedSleep)
    assert start_client_internal.time.cap == 0.25
    flower_tuning.tune_supernode_polling()  # applying it twice is fine
    with pytest.raises(ValueError, match="cap must be > 0"):
        flower_tuning.tune_supernode_polling(0)


def test_run_supernode_runs_flowers_supernode_with_its_options(restore_flower, monkeypatch) -> None:
    import importlib

    # the module (the package exports a function of that name)
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")

    seen = []
    monkeypatch.setattr(cli, "flower_supernode", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    flower_tuning.run_supernode(["--superlink", "127.0.0.1:9092", "--insecure"])
    assert seen == [["flower-supernode", "--superlink", "127.0.0.1:9092", "--insecure"]]
    from flwr.supercore.inflatable import inflatable_utils

    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == flower_tuning.PULL_INITIAL_BACKOFF
