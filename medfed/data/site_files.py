"""Cut one MedMNIST file (or one labels table) into per-site data, for rehearsing a deployment on public data.

In a real deployment every hospital already has its own images. To rehearse one (or to test
the deployment runtime), `write_site_files` divides a MedMNIST file's official splits among
named sites with the same partition code as simulation, and writes one MedMNIST-layout file
per site: ``OUT/<site>/<flag>.npz`` holding that site's share of train, val and test (the
flag is kept in the file name so the task is read exactly as from the original). Every file
is complete or absent: the folder is built under a temporary name and renamed into place.

A labels table, datalist or class folders is cut into one labels table per site, ``OUT/<site>/labels.csv``,
whose rows point at the same image files (absolute paths: nothing is copied): ``--partition natural`` gives each
hospital of the table's site column its own rows (the sites named as the table names them), the other schemes
cut the table's patients (rows without a patient: each its own) among the named sites with the same proportions
as simulation. Every row keeps its label, split and patient.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from medfed.constants import PartitionScheme, check_site_names
from medfed.data.datalists import is_table_source, read_source
from medfed.data.medmnist import REQUIRED_KEYS, load_medmnist
from medfed.data.partition import assign, make_site_plan, site_proportions, summarize
from medfed.data.table import Case, LabelsTable
from medfed.exceptions import SplitError
from medfed.files import build_folder

SITES_JSON = "sites.json"


def write_site_files(data: str, sites: list[str], out: Path, *, partition: str = "iid", alpha: float = 0.5,
                     seed: int = 0, min_site_size: int = 10, overwrite: bool = False) -> dict[str, Path]:
    """Write ``OUT/<site>/<flag>.npz`` for each site; returns the file of each site."""
    if is_table_source(data):
        return write_site_tables(data, sites, out, partition=partition, alpha=alpha, seed=seed,
                                 min_site_size=min_site_size, overwrite=overwrite)
    check_site_names(sites)
    source = load_medmnist(data)  # validated: keys, shapes, labels
    plan = make_site_plan(source.train.labels, source.val.labels, source.task, test_labels=source.test.labels,
                          scheme=partition, num_sites=len(sites), alpha=alpha, label_fraction=1.0, seed=seed,
                          data_sha256=source.sha256, min_site_size=min_site_size)
    with np.load(source.path, allow_pickle=False) as npz:
        raw = {k: npz[k] for k in REQUIRED_KEYS}
    out = out.expanduser()

    def build(tmp: Path) -> None:
        for name, split in zip(sites, plan.sites, strict=True):
            (tmp / name).mkdir()
            parts = {"train": split.train, "val": split.val, "test": split.test}
            arrays = {f"{s}_{kind}": raw[f"{s}_{kind}"][np.asarray(idx, dtype=np.int64)]
                      for s, idx in parts.items() for kind in ("images", "labels")}
            np.savez_compressed(tmp / name / f"{source.name}.npz", **arrays)
        counts = summarize(plan, source.train.labels, source.val.labels, source.task)
        (tmp / SITES_JSON).write_text(json.dumps({
            "source": str(source.path), "sha256": source.sha256, "partition": partition, "alpha": alpha, "seed": seed,
            "sites": dict(zip(sites, counts, strict=True)),
        }, indent=1))

    build_folder(out, build, overwrite=overwrite, refusal="refusing to overwrite site data")
    return {name: out / name / f"{source.name}.npz" for name in sites}


def write_site_tables(data: str, sites: list[str], out: Path, *, partition: str = "iid", alpha: float = 0.5,
                      seed: int = 0, min_site_size: int = 10, overwrite: bool = False) -> dict[str, Path]:
    """Write ``OUT/<site>/labels.csv`` for each site (``natural``: each hospital of the table, ``sites`` empty or
    the same names); returns the table of each site.

    Raises:
        SplitError: natural without a site column, sites that differ from the table's, a site with fewer than
            ``min_site_size`` rows.
    """
    table = read_source(data)
    scheme = PartitionScheme(partition)
    if scheme == PartitionScheme.NATURAL:
        if not table.sites:
            raise SplitError("partition natural needs a table whose site column names each row's hospital")
        if sites and sites != table.sites:
            raise SplitError(f"partition natural keeps the table's hospitals ({', '.join(table.sites)}); leave "
                             "--sites out or name exactly those")
        sites = table.sites
        shares = {name: [c for c in table.cases if c.site == name] for name in sites}
    else:
        check_site_names(sites)
        shares = _cut_patients(table, sites, scheme, alpha, seed)
    for name, rows in shares.items():
        if len(rows) < min_site_size:
            raise SplitError(f"site {name!r} would get {len(rows)} rows, fewer than min-site-size {min_site_size}")
    out = out.expanduser()

    def build(tmp: Path) -> None:
        for index, (name, rows) in enumerate(shares.items()):
            folder = tmp / (name if scheme != PartitionScheme.NATURAL else f"site{index}")
            folder.mkdir()
            with (folder / "labels.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["image", "label", "split", "patient"])
                for case in rows:
                    label = ("" if case.label is None else ";".join(map(str, case.label))
                             if isinstance(case.label, tuple) else str(case.label))
                    writer.writerow([str(case.image), label, case.split, case.patient])
        (tmp / SITES_JSON).write_text(json.dumps({
            "source": str(table.path), "partition": scheme.value, "alpha": alpha, "seed": seed,
            "sites": {name: {"rows": len(rows), "labelled": sum(c.label is not None for c in rows),
                             "folder": name if scheme != PartitionScheme.NATURAL else f"site{i}"}
                      for i, (name, rows) in enumerate(shares.items())},
        }, indent=1))

    build_folder(out, build, overwrite=overwrite, refusal="refusing to overwrite site data")
    return {name: out / (name if scheme != PartitionScheme.NATURAL else f"site{i}") / "labels.csv"
            for i, name in enumerate(shares)}


def _cut_patients(table: LabelsTable, sites: list[str], scheme: PartitionScheme, alpha: float, seed: int
                  ) -> dict[str, list[Case]]:
    """Each site's rows: the table's patients cut by class (first row's label; unlabelled a stratum of its own)."""
    groups: dict[str, list[Case]] = defaultdict(list)
    for case in table.cases:
        groups[case.patient or f"\0row{case.row}"].append(case)
    names = list(groups)

    def key(rows: list[Case]) -> int:
        label = next((c.label for c in rows if c.label is not None), None)
        if label is None:
            return table.num_classes + 1
        return (label.index(1) if 1 in label else table.num_classes) if isinstance(label, tuple) else label

    keys = np.asarray([key(groups[n]) for n in names])
    rng = np.random.default_rng(seed)
    props = site_proportions(scheme, np.arange(int(keys.max()) + 1), len(sites), alpha, rng)
    parts = assign(keys, props, rng)
    return {site: [c for g in part for c in groups[names[g]]] for site, part in zip(sites, parts, strict=True)}
