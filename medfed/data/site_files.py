"""Cut one MedMNIST file into per-site files, for rehearsing a deployment on public data.

In a real deployment every hospital already has its own images. To rehearse one (or to test
the deployment runtime), `write_site_files` divides a MedMNIST file's official splits among
named sites with the same partition code as simulation, and writes one MedMNIST-layout file
per site: ``OUT/<site>/<flag>.npz`` holding that site's share of train, val and test (the
flag is kept in the file name so the task is read exactly as from the original). Every file
is complete or absent: the folder is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medfed.constants import check_site_names
from medfed.data.medmnist import REQUIRED_KEYS, load_medmnist
from medfed.data.partition import make_site_plan, summarize
from medfed.files import build_folder

SITES_JSON = "sites.json"


def write_site_files(data: str, sites: list[str], out: Path, *, partition: str = "iid", alpha: float = 0.5,
                     seed: int = 0, min_site_size: int = 10, overwrite: bool = False) -> dict[str, Path]:
    """Write ``OUT/<site>/<flag>.npz`` for each site; returns the file of each site."""
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
