"""Divide a dataset's official splits into simulated hospital sites.

Schemes (all seeded with `numpy.random.default_rng`):

* ``iid`` - each class's random permutation cut into N near-equal parts: every site gets the global class mix,
  and each class's count differs by at most one between sites (so totals by at most the number of classes:
  4708 PneumoniaMNIST images into 1000 sites give 4 to 6 each).
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
metrics of the global model) follow its own distribution. A site too small for a share of the val split
(more sites than val images) gets none: it is still a site (it trains), and federated evaluation evaluates
it on its share of the test split instead (`medfed.task.site_round.evaluate_site`). Inside a site's train part a
``label_fraction`` is labelled (at least one image); every train image, labelled or not,
is used for self-supervised pretraining. Flower Datasets' partitioners work on Hugging Face
datasets, not on in-memory index arrays shared by two splits, so this module stays small
and is tested directly instead.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.constants import PartitionScheme, TaskType
from medfed.exceptions import SplitError

MAX_DRAWS = 200
SPLIT_FILE = "split.json"  # the plan's file name inside a run directory
AUTO_SITE_SIZE = 10  # min-site-size 0 (automatic): at least this many train images a site, where the split allows


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
    min_site_size: int = 0  # the fewest train images a site could get, as resolved (0: a plan written before)
    iid_floor: int = 0  # non-IID with automatic min-site-size on a small split: train images per site dealt IID first

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> SitePlan:
        raw = json.loads(path.read_text())
        raw["sites"] = [SiteSplit(**s) for s in raw["sites"]]
        return cls(**raw)


def load_plan(path: Path) -> SitePlan:
    """`SitePlan.load`, cached by the file's identity (path, size, modification time): a simulated site reads the
    run's plan with every message, and a thousand sites' plan takes milliseconds to parse."""
    stat = path.stat()
    return _load_plan(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_plan(path: str, size: int, mtime_ns: int) -> SitePlan:
    return SitePlan.load(Path(path))


def resolve_min_site_size(min_site_size: int, n_train: int, num_sites: int) -> int:
    """min-site-size as a partition applies it: a value given is kept; 0 (automatic) is `AUTO_SITE_SIZE`, or
    ``n_train // num_sites`` when the train split is too small for that (0 when it has fewer images than sites)."""
    if min_site_size > 0:
        return min_site_size
    return min(AUTO_SITE_SIZE, n_train // max(1, num_sites))


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
    min_site_size: int = 0,
) -> SitePlan:
    """Divide train, val (and test) into ``num_sites`` sites; raise `SplitError` if impossible.

    Every train image lands in exactly one site; a site gets at least ``min_site_size`` train images (0:
    automatic, `resolve_min_site_size`; the plan records the value applied). Val and test are cut with the same
    proportions: a site may get no val image (more sites than val images), and is still a site. Non-IID draws
    are repeated (up to 200 times, seeded) until the sizes hold; the error names the setting to change if they
    never do. The IID cut is the same for every draw (only its membership is random): with min-site-size
    automatic, a smaller smallest site than the automatic value is accepted (many classes, few images each).
    """
    scheme_enum = PartitionScheme(scheme)
    if scheme_enum == PartitionScheme.NATURAL:
        raise SplitError("partition natural takes each hospital's rows from a labels table's site column "
                         "(make_natural_plan); it cannot cut a file without one")
    n_train = len(train_labels)
    if num_sites < 1:
        raise SplitError(f"num-sites must be >= 1; got {num_sites}")
    auto, size = min_site_size == 0, resolve_min_site_size(min_site_size, n_train, num_sites)
    if n_train < num_sites * max(1, size):
        raise SplitError(
            f"cannot give {num_sites} sites at least {max(1, size)} training image(s) each: the train split has only "
            f"{n_train} images (at most {n_train // num_sites} each); "
            + ("lower num-sites" if auto or n_train < num_sites else "lower min-site-size (0: automatic) or num-sites")
        )
    if not 0 < label_fraction <= 1:
        raise SplitError(f"label-fraction must be in (0, 1]; got {label_fraction}")
    rng = np.random.default_rng(seed)
    train_keys, val_keys = stratify_key(train_labels, task), stratify_key(val_labels, task)
    classes = int(max(train_keys.max(), val_keys.max())) + 1
    if (train_keys < 0).any():  # unlabelled cases: one more stratum, cut like a class
        train_keys = np.where(train_keys < 0, classes, train_keys)
        classes += 1
    floor = 0
    for _ in range(MAX_DRAWS):
        props = site_proportions(scheme_enum, np.arange(classes), num_sites, alpha, rng)
        train_parts = assign(train_keys, props, rng)
        val_parts = assign(val_keys, props, rng)
        smallest = min(len(p) for p in train_parts)
        if auto and scheme_enum == PartitionScheme.IID and smallest >= 1:
            size = min(size, smallest)  # the IID cut is what the train split allows
        if smallest >= size:
            break
        if scheme_enum == PartitionScheme.IID:  # every IID draw has the same sizes
            raise SplitError(f"the iid cut of {n_train} train images into {num_sites} sites gives its smallest site "
                             f"{smallest}, fewer than min-site-size {size}; lower min-site-size (0: automatic) "
                             "or num-sites")
    else:
        if not auto:
            raise SplitError(
                f"{scheme} split with alpha={alpha} left a site with fewer than {size} train images "
                f"in {MAX_DRAWS} seeded draws; raise alpha, lower num-sites ({num_sites}) "
                "or lower min-site-size (0: automatic)"
            )
        # automatic size, a split too small for the skewed draws alone (a thousand sites of a few images): every site
        # first gets ``size`` train images dealt IID, then the rest is cut by the scheme's shares
        floor = size
        props, train_parts, val_parts = floored_cut(scheme_enum, train_keys, val_keys, classes, num_sites, alpha,
                                                    floor, np.random.default_rng([seed, 3]))
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
        min_site_size=size,
        iid_floor=floor,
    )


def floored_cut(scheme: PartitionScheme, train_keys: np.ndarray, val_keys: np.ndarray, classes: int, num_sites: int,
                alpha: float, floor: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """A skewed cut with a floor: ``floor`` train images per site dealt at random (IID), the remaining train images
    and the val split cut by one draw of the scheme's class shares. Returns the shares and the train and val parts.
    Used only when min-site-size is automatic and the scheme's draws alone leave sites with fewer (with 4708 images
    into 1000 Dirichlet(0.5) sites, about one site in ten would get none)."""
    order = rng.permutation(len(train_keys))
    base, rest = order[: floor * num_sites], order[floor * num_sites:]
    props = site_proportions(scheme, np.arange(classes), num_sites, alpha, rng)
    rest_parts = assign(train_keys[rest], props, rng)
    train_parts = [np.sort(np.concatenate([chunk, rest[part]]))
                   for chunk, part in zip(np.split(base, num_sites), rest_parts, strict=True)]
    return props, train_parts, assign(val_keys, props, rng)


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
    """One site per hospital, holding its own rows of each split (``*_sites``: each case's hospital); min-site-size
    0 is automatic (`resolve_min_site_size`).

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
    min_site_size = resolve_min_site_size(min_site_size, len(train_sites), len(site_names))
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
                    site_names=list(site_names), min_site_size=min_site_size)


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


SIZE_COLUMNS = ("train", "labelled", "val", "test")


def size_distribution(rows: list[dict]) -> dict[str, Any]:
    """How many images the sites got (`summarize`'s rows): min, quartiles and max of each of train, labelled, val
    and test, and how many sites have no val image (federated evaluation evaluates those on their test share)."""
    out: dict[str, Any] = {"sites": len(rows), "sites_without_val": sum(1 for r in rows if not r["val"])}
    for key in SIZE_COLUMNS:
        values = np.asarray([r.get(key, 0) for r in rows], dtype=np.float64)
        quartiles = np.percentile(values, [0, 25, 50, 75, 100]) if len(values) else np.zeros(5)
        out[key] = {name: round(float(q), 2) for name, q in zip(("min", "q1", "median", "q3", "max"), quartiles,
                                                                   strict=True)}
    return out


def describe_sizes(dist: dict[str, Any]) -> str:
    """One line for a console or a report: each count's range and median, and the sites without val."""
    parts = [f"{key} {dist[key]['min']:g}-{dist[key]['max']:g} (median {dist[key]['median']:g})"
             for key in SIZE_COLUMNS if key in dist]
    floor = f" ({dist['iid_floor']} train images per site dealt IID first)" if dist.get("iid_floor") else ""
    return f"{dist['sites']} sites{floor}, images per site: " + ", ".join(parts) + (
        f"; {dist['sites_without_val']} site(s) without val (evaluated on their test share)"
        if dist["sites_without_val"] else "")
