"""Divide a dataset's official splits into simulated hospital sites.

Schemes (all seeded with `numpy.random.default_rng`):

* ``iid`` - a random permutation cut into N near-equal parts.
* ``dirichlet`` - label skew (Hsu et al. 2019, "Measuring the effects of non-identical data
  distribution"): for each class, site shares are drawn from Dir(alpha); small alpha gives
  sites dominated by few classes.
* ``quantity`` - quantity skew: site sizes follow Dir(alpha) shares, labels IID.
* ``natural`` - a labels table's own hospitals (its ``site`` column), as FLamby's natural centres
  (Ogier du Terrail et al., NeurIPS 2022): every hospital is a site and keeps its own rows
  (`make_natural_plan`).

A labels table's train split may hold unlabelled cases (label -1): they form a stratum of their own,
are pretrained on, and are never drawn as labelled.

The same site proportions cut the official train, val and test splits, so each site's
validation data (and its share of the test split, used only to report per-site test
metrics of the global model) follow its own distribution. Inside a site's train part a
``label_fraction`` is labelled (at least one image); every train image, labelled or not,
is used for self-supervised pretraining. Flower Datasets' partitioners work on Hugging Face
datasets, not on in-memory index arrays shared by two splits, so this module stays small
and is tested directly instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medfed.constants import PartitionScheme, TaskType
from medfed.exceptions import SplitError

MAX_DRAWS = 200
SPLIT_FILE = "split.json"  # the plan's file name inside a run directory


@dataclass(frozen=True)
class SiteSplit:
    """Indices into the official splits held by one site."""

    site_id: int
    train: list[int]  # official-train indices (all used for pretraining)
    labelled: list[int]  # subset of `train` whose labels the site may use
    val: list[int]  # official-val indices (site's held-out labelled data)
    test: list[int] = field(default_factory=list)  # official-test indices cut like the site's data (evaluation only)


@dataclass(frozen=True)
class SitePlan:
    """The whole division: written to ``split.json`` in the run directory."""

    scheme: str
    num_sites: int
    alpha: float
    label_fraction: float
    seed: int
    data_sha256: str
    sites: list[SiteSplit]
    site_names: list[str] = field(default_factory=list)  # natural sites: the hospitals, as the table spells them

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> SitePlan:
        raw = json.loads(path.read_text())
        raw["sites"] = [SiteSplit(**s) for s in raw["sites"]]
        return cls(**raw)


def stratify_key(labels: np.ndarray, task: TaskType) -> np.ndarray:
    """One class per image for label-skew: the class, or the first positive label (K if none); -1 for an
    unlabelled case (a row of -1)."""
    unlabelled = labels[:, 0] < 0 if len(labels) else np.zeros(0, dtype=bool)
    if task != TaskType.MULTILABEL:
        return np.where(unlabelled, -1, labels[:, 0])
    positive = labels > 0
    return np.where(unlabelled, -1, np.where(positive.any(axis=1), positive.argmax(axis=1), labels.shape[1]))


def draw_labelled(train: np.ndarray, train_labels: np.ndarray, label_fraction: float,
                  rng: np.random.Generator) -> np.ndarray:
    """The labelled subset of a site's train indices: ``label_fraction`` of those that have a label (at least one,
    when any has), sorted."""
    pool = train[train_labels[train, 0] >= 0] if len(train) else train
    if not len(pool):
        return pool
    n_lab = max(1, int(round(label_fraction * len(pool))))
    return np.sort(rng.choice(pool, size=n_lab, replace=False))


def site_proportions(
    scheme: PartitionScheme, keys: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """Matrix ``(num_classes, num_sites)`` of each class's share per site (rows sum to 1)."""
    classes = int(keys.max()) + 1
    if scheme == PartitionScheme.IID:
        return np.full((classes, num_sites), 1.0 / num_sites)
    if scheme == PartitionScheme.QUANTITY:
        return np.tile(rng.dirichlet(np.full(num_sites, alpha)), (classes, 1))
    return rng.dirichlet(np.full(num_sites, alpha), size=classes)


def assign(keys: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Cut each class's shuffled indices by the cumulative shares; returns sorted per-site arrays."""
    num_sites = proportions.shape[1]
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for cls in range(proportions.shape[0]):
        idx = rng.permutation(np.flatnonzero(keys == cls))
        cuts = np.round(np.cumsum(proportions[cls])[:-1] * len(idx)).astype(int)
        for site, chunk in enumerate(np.split(idx, cuts)):
            parts[site].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def make_site_plan(
    train_labels: np.ndarray,
    val_labels: np.ndarray,
    task: TaskType,
    *,
    test_labels: np.ndarray | None = None,
    scheme: str,
    num_sites: int,
    alpha: float,
    label_fraction: float,
    seed: int,
    data_sha256: str = "",
    min_site_size: int = 10,
) -> SitePlan:
    """Divide train and val into ``num_sites`` sites; raise `SplitError` if impossible.

    Every train image lands in exactly one site; a site gets at least ``min_site_size``
    train images and one val image. Non-IID draws are repeated (up to 200 times, seeded)
    until that holds; the error names the setting to change if they never do.
    """
    scheme_enum = PartitionScheme(scheme)
    if scheme_enum == PartitionScheme.NATURAL:
        raise SplitError("partition natural takes each hospital's rows from a labels table's site column "
                         "(make_natural_plan); it cannot cut a file without one")
    n_train, n_val = len(train_labels), len(val_labels)
    if num_sites < 1:
        raise SplitError(f"num-sites must be >= 1; got {num_sites}")
    if n_train < num_sites * min_site_size:
        raise SplitError(
            f"cannot give {num_sites} sites at least {min_site_size} training images each: "
            f"the train split has only {n_train} images"
        )
    if n_val < num_sites:
        raise SplitError(f"cannot give {num_sites} sites a validation image each: the val split has {n_val}")
    if not 0 < label_fraction <= 1:
        raise SplitError(f"label-fraction must be in (0, 1]; got {label_fraction}")
    rng = np.random.default_rng(seed)
    train_keys, val_keys = stratify_key(train_labels, task), stratify_key(val_labels, task)
    classes = int(max(train_keys.max(), val_keys.max())) + 1
    if (train_keys < 0).any():  # unlabelled cases: one more stratum, cut like a class
        train_keys = np.where(train_keys < 0, classes, train_keys)
        classes += 1
    for _ in range(MAX_DRAWS):
        props = site_proportions(scheme_enum, np.arange(classes), num_sites, alpha, rng)
        train_parts = assign(train_keys, props, rng)
        val_parts = assign(val_keys, props, rng)
        if min(len(p) for p in train_parts) >= min_site_size and min(len(p) for p in val_parts) >= 1:
            break
    else:
        raise SplitError(
            f"{scheme} split with alpha={alpha} left a site with fewer than {min_site_size} train images "
            f"or no val image in {MAX_DRAWS} seeded draws; raise alpha, lower num-sites ({num_sites}) "
            "or lower min-site-size"
        )
    # The test split is cut with the same proportions but its own generator, so adding it
    # leaves the train, val and labelled draws of a seed unchanged.
    test_parts = (
        assign(stratify_key(test_labels, task), props, np.random.default_rng([seed, 2]))
        if test_labels is not None else [np.array([], dtype=int)] * num_sites
    )
    sites = []
    for site_id, (tr, va, te) in enumerate(zip(train_parts, val_parts, test_parts, strict=True)):
        labelled = draw_labelled(tr, train_labels, label_fraction, rng)
        sites.append(SiteSplit(site_id, tr.tolist(), labelled.tolist(), va.tolist(), te.tolist()))
    return SitePlan(
        scheme=scheme_enum.value,
        num_sites=num_sites,
        alpha=alpha,
        label_fraction=label_fraction,
        seed=seed,
        data_sha256=data_sha256,
        sites=sites,
    )


def make_natural_plan(
    train_sites: Sequence[str],
    val_sites: Sequence[str],
    test_sites: Sequence[str],
    site_names: Sequence[str],
    train_labels: np.ndarray,
    *,
    label_fraction: float,
    seed: int,
    data_sha256: str = "",
    min_site_size: int = 10,
) -> SitePlan:
    """One site per hospital, holding its own rows of each split (``*_sites``: each case's hospital).

    Raises:
        SplitError: naming the hospital: a row without a site, a hospital with fewer than ``min_site_size``
            train cases, no val case or no labelled train case.
    """
    if not site_names:
        raise SplitError("partition natural needs a labels table with a site column naming each row's hospital")
    for split, names in (("train", train_sites), ("val", val_sites), ("test", test_sites)):
        if any(not n for n in names):
            raise SplitError(f"partition natural: a {split} row names no site; every row must name its hospital")
    if not 0 < label_fraction <= 1:
        raise SplitError(f"label-fraction must be in (0, 1]; got {label_fraction}")
    rng = np.random.default_rng(seed)
    train_of, val_of, test_of = (np.asarray(list(x), dtype=object) for x in (train_sites, val_sites, test_sites))
    sites = []
    for site_id, name in enumerate(site_names):
        tr, va, te = (np.flatnonzero(of == name) for of in (train_of, val_of, test_of))
        problem = ("fewer than min-site-size "
                   f"({min_site_size}) train cases ({len(tr)})" if len(tr) < min_site_size
                   else "no val case" if not len(va)
                   else "no labelled train case" if not (train_labels[tr, 0] >= 0).any() else "")
        if problem:
            raise SplitError(f"partition natural: hospital {name!r} has {problem}; give it more rows or lower "
                             "min-site-size / val-fraction settings")
        labelled = draw_labelled(tr, train_labels, label_fraction, rng)
        sites.append(SiteSplit(site_id, tr.tolist(), labelled.tolist(), va.tolist(), te.tolist()))
    return SitePlan(scheme=PartitionScheme.NATURAL.value, num_sites=len(site_names), alpha=0.0,
                    label_fraction=label_fraction, seed=seed, data_sha256=data_sha256, sites=sites,
                    site_names=list(site_names))


def summarize(plan: SitePlan, train_labels: np.ndarray, val_labels: np.ndarray, task: TaskType) -> list[dict]:
    """Per-site counts for reports: train, labelled, val, test share, and train images per class
    (for multi-label data: per first positive label, last bucket = no label)."""
    tk, vk = stratify_key(train_labels, task), stratify_key(val_labels, task)
    classes = int(max(tk.max(), vk.max())) + 1
    rows = []
    for s in plan.sites:
        keys = tk[s.train]
        per_class = np.bincount(keys[keys >= 0], minlength=classes).tolist()
        named = {"hospital": plan.site_names[s.site_id]} if plan.site_names else {}
        unlabelled = {"unlabelled": int((keys < 0).sum())} if (tk < 0).any() else {}
        rows.append(
            {
                "site": s.site_id, **named, **unlabelled,
                "train": len(s.train),
                "labelled": len(s.labelled),
                "val": len(s.val),
                "test": len(s.test),
                "train_per_class": per_class,
            }
        )
    return rows
