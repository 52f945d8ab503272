"""Properties of make_site_plan (medfed.data.partition) on real PneumoniaMNIST labels."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import SHARED_DATA
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from medfed.constants import TaskType
from medfed.data.partition import SitePlan, make_site_plan, stratify_key, summarize
from medfed.exceptions import SplitError

SHARED = SHARED_DATA
pytestmark = pytest.mark.usefixtures("shared_data")  # fails, not skips, when the pinned files are missing

SCHEMES = ("iid", "dirichlet", "quantity")
HYP = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@functools.lru_cache(maxsize=1)
def pneumonia_labels() -> tuple[np.ndarray, np.ndarray]:
    with np.load(SHARED / "pneumoniamnist.npz") as npz:
        return npz["train_labels"].astype(np.int64), npz["val_labels"].astype(np.int64)


def plan_for(scheme="iid", num_sites=5, alpha=0.5, label_fraction=0.1, seed=0, **kw) -> SitePlan:
    train, val = pneumonia_labels()
    return make_site_plan(
        train, val, TaskType.BINARY, scheme=scheme, num_sites=num_sites, alpha=alpha,
        label_fraction=label_fraction, seed=seed, **kw,
    )


def _try_plan(**kw) -> SitePlan:
    try:
        return plan_for(**kw)
    except SplitError as exc:  # a legitimately impossible non-IID draw; the message says what to change
        assert "raise alpha" in str(exc)
        assume(False)
        raise


def _check_cover(parts: list[list[int]], n: int) -> None:
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    assert len(flat) == n, "some index is missing or used twice"
    assert np.array_equal(np.sort(flat), np.arange(n))
    for p in parts:
        assert list(p) == sorted(set(p))  # sorted, no duplicates inside a site


@HYP
@given(
    scheme=st.sampled_from(SCHEMES),
    num_sites=st.integers(1, 6),
    alpha=st.sampled_from([0.3, 1.0, 10.0]),
    label_fraction=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**16),
)
def test_plan_properties(scheme, num_sites, alpha, label_fraction, seed):
    train, val = pneumonia_labels()
    plan = _try_plan(scheme=scheme, num_sites=num_sites, alpha=alpha, label_fraction=label_fraction, seed=seed)
    assert plan.num_sites == num_sites == len(plan.sites)
    assert [s.site_id for s in plan.sites] == list(range(num_sites))
    assert plan.scheme == scheme and plan.seed == seed and plan.label_fraction == label_fraction
    _check_cover([s.train for s in plan.sites], len(train))
    _check_cover([s.val for s in plan.sites], len(val))
    for s in plan.sites:
        assert len(s.train) >= 10 and len(s.val) >= 1
        assert set(s.labelled) <= set(s.train)
        assert len(set(s.labelled)) == len(s.labelled) == max(1, round(label_fraction * len(s.train)))
        assert s.labelled == sorted(s.labelled)


@HYP
@given(scheme=st.sampled_from(SCHEMES), num_sites=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_same_seed_same_plan_different_seed_different(scheme, num_sites, seed):
    a = _try_plan(scheme=scheme, num_sites=num_sites, alpha=1.0, seed=seed)
    b = _try_plan(scheme=scheme, num_sites=num_sites, alpha=1.0, seed=seed)
    c = _try_plan(scheme=scheme, num_sites=num_sites, alpha=1.0, seed=seed + 1)
    assert a == b
    assert [s.train for s in a.sites] != [s.train for s in c.sites]
    assert [s.labelled for s in a.sites] != [s.labelled for s in c.sites]


def test_iid_sites_near_equal_with_global_class_mix():
    train, _ = pneumonia_labels()
    plan = plan_for("iid", num_sites=4)
    sizes = [len(s.train) for s in plan.sites]
    assert max(sizes) - min(sizes) <= 2  # each class cut into near-equal parts
    global_pos = train[:, 0].mean()
    for s in plan.sites:
        assert abs(train[s.train, 0].mean() - global_pos) < 0.01


def _mean_tv(plan: SitePlan) -> float:
    train, _ = pneumonia_labels()
    g = np.bincount(train[:, 0], minlength=2) / len(train)
    tvs = []
    for s in plan.sites:
        c = np.bincount(train[s.train, 0], minlength=2) / len(s.train)
        tvs.append(0.5 * np.abs(c - g).sum())
    return float(np.mean(tvs))


def test_small_alpha_gives_label_skew():
    iid = np.mean([_mean_tv(plan_for("iid", num_sites=5, seed=s)) for s in range(5)])
    skewed = np.mean([_mean_tv(plan_for("dirichlet", num_sites=5, alpha=0.1, seed=s)) for s in range(5)])
    mild = np.mean([_mean_tv(plan_for("dirichlet", num_sites=5, alpha=100.0, seed=s)) for s in range(5)])
    assert iid < 0.01
    assert skewed > 0.2
    assert skewed > mild > iid


def test_quantity_skew_keeps_labels_iid_but_sizes_vary():
    train, _ = pneumonia_labels()
    plan = plan_for("quantity", num_sites=4, alpha=0.5, seed=3)
    sizes = [len(s.train) for s in plan.sites]
    assert max(sizes) > 2 * min(sizes)
    assert _mean_tv(plan) < 0.02
    # val is cut with the same site proportions as train
    val_sizes = np.array([len(s.val) for s in plan.sites]) / sum(len(s.val) for s in plan.sites)
    np.testing.assert_allclose(val_sizes, np.array(sizes) / len(train), atol=0.02)


def test_full_label_fraction_labels_everything():
    for s in plan_for("dirichlet", num_sites=3, label_fraction=1.0).sites:
        assert s.labelled == s.train


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(num_sites=500, min_site_size=10), "the train split has only 4708 images (at most 9 each); lower "
                                                "min-site-size"),  # 500 sites x 10 images > 4708, given explicitly
        (dict(num_sites=4709, min_site_size=1), "at least 1 training image(s)"),  # more sites than images
        (dict(num_sites=4709), "lower num-sites"),  # automatic: more sites than images
        (dict(num_sites=0), "num-sites must be >= 1"),
        (dict(label_fraction=0.0), "label-fraction must be in (0, 1]"),
        (dict(label_fraction=1.5), "label-fraction must be in (0, 1]"),
        (dict(label_fraction=-0.1), "label-fraction must be in (0, 1]"),
        (dict(scheme="dirichlet", num_sites=50, alpha=0.001, min_site_size=10), "raise alpha"),  # given: strict
    ],
)
def test_impossible_splits_raise(kwargs, fragment):
    with pytest.raises(SplitError) as err:
        plan_for(**kwargs)
    assert fragment in str(err.value)


def test_more_sites_than_val_images_leave_sites_without_val():
    train, val = pneumonia_labels()
    plan = make_site_plan(train, val[:3], TaskType.BINARY, scheme="iid", num_sites=4, alpha=1.0,
                          label_fraction=0.5, seed=0, min_site_size=1)
    assert sorted(len(s.val) for s in plan.sites) == [0, 1, 1, 1]  # a site without val is still a site
    _check_cover([s.val for s in plan.sites], 3)
    assert min(len(s.train) for s in plan.sites) >= 1


def test_min_site_size_automatic_and_recorded():
    assert plan_for("iid", num_sites=5).min_site_size == 10  # the default sizes: 10, as before
    # 4708 // 500 = 9, but the IID cut (each class cut apart) gives its smallest site 8: automatic takes 8 ...
    assert plan_for("iid", num_sites=500).min_site_size == 8
    with pytest.raises(SplitError, match="iid cut of 4708 train images into 500 sites gives its smallest site 8, "
                                         "fewer than min-site-size 9; lower min-site-size"):
        plan_for("iid", num_sites=500, min_site_size=9)  # ... and a value given is honoured strictly
    assert plan_for("dirichlet", num_sites=5, alpha=0.5, min_site_size=25).min_site_size == 25  # given: kept


def test_save_load_round_trip(tmp_path):
    plan = plan_for("dirichlet", num_sites=4, alpha=0.5, label_fraction=0.05, seed=7, data_sha256="abc123")
    path = tmp_path / "split.json"
    plan.save(path)
    loaded = SitePlan.load(path)
    assert loaded == plan
    assert loaded.sites[2].labelled == plan.sites[2].labelled
    assert loaded.data_sha256 == "abc123" and loaded.alpha == 0.5


def test_multilabel_stratify_key_and_summary():
    labels = np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1]])
    assert stratify_key(labels, TaskType.MULTILABEL).tolist() == [1, 3, 0, 2]
    train, val = pneumonia_labels()
    plan = plan_for("iid", num_sites=2)
    rows = summarize(plan, train, val, TaskType.BINARY)
    assert [r["train"] for r in rows] == [len(s.train) for s in plan.sites]
    assert sum(sum(r["train_per_class"]) for r in rows) == len(train)
    assert sum(r["train_per_class"][1] for r in rows) == 3494


def test_test_split_shares_partition_it_and_leave_other_draws_unchanged() -> None:
    train, val = pneumonia_labels()
    with np.load(SHARED / "pneumoniamnist.npz") as npz:
        test = npz["test_labels"].astype(np.int64)
    common = dict(scheme="dirichlet", num_sites=5, alpha=0.5, label_fraction=0.1, seed=3)
    with_test = make_site_plan(train, val, TaskType.BINARY, test_labels=test, **common)
    without = make_site_plan(train, val, TaskType.BINARY, **common)
    shares = np.concatenate([s.test for s in with_test.sites])
    assert sorted(shares.tolist()) == list(range(len(test)))
    for a, b in zip(with_test.sites, without.sites, strict=True):
        assert (a.train, a.labelled, a.val) == (b.train, b.labelled, b.val) and b.test == []
