"""Means over sites of a federated arm's last-round evaluation: the global model on the sites' validation data
(what a run's settings are chosen by) and on their shares of the test split, and each site's personalised model
(``personal``) on the same data. For summary.json and report.md.

Each mean is over the sites' last evaluated round (under ``finetune-select best-validation`` the round whose model
the arm kept), weighted by each site's number of images; a site whose metric
is undefined (AUC of a single-class share) is left out of that metric's mean.
"""

from __future__ import annotations

import math
from typing import Any

from medfed.constants import PERSONAL_PREFIX, PERSONAL_TEST_PREFIX
from medfed.experiment.model_selection import SELECTED_SPLIT
from medfed.experiment.recorder import GLOBAL

MEAN_METRICS = ("auc", "accuracy", "sensitivity", "specificity")


def _selected_round(rows: list[dict[str, Any]], arm: str) -> int | None:
    """The fine-tuning round whose global model the arm kept (``finetune-select best-validation``), else None."""
    chosen = [r for r in rows if r.get("arm") == arm and r.get("split") == SELECTED_SPLIT and r.get("site") == GLOBAL]
    return int(chosen[-1]["round"]) if chosen else None


def kept_round(rows: list[dict[str, Any]], arm: str) -> dict[str, int]:
    """``{"selected_round": N}`` when the arm kept round N's model (``finetune-select best-validation``), else {}."""
    kept = _selected_round(rows, arm)
    return {} if kept is None else {"selected_round": kept}


def _last_rows(rows: list[dict[str, Any]], arm: str, split: str, at: int | None = None) -> list[dict[str, Any]]:
    """Each site's last row of ``split`` (only those of round ``at`` when given: the kept round's model)."""
    last: dict[Any, dict[str, Any]] = {}
    for r in rows:
        if at is not None and r.get("round", 0) != at:
            continue
        if r.get("arm") == arm and r.get("split") == split and r.get("accepted", True) is not False:
            if r["site"] not in last or r["round"] >= last[r["site"]]["round"]:
                last[r["site"]] = r
    return list(last.values())


def weighted_means(rows: list[dict[str, Any]], prefix: str = "", weight: str = "num-examples",
                   sizes: dict[Any, float] | None = None) -> dict[str, float]:
    """Example-weighted mean over ``rows`` of each of `MEAN_METRICS` (read as ``prefix + name``)."""
    out: dict[str, float] = {}
    for name in MEAN_METRICS:
        pairs = []
        for r in rows:
            value = r.get(prefix + name)
            n = sizes.get(r["site"], 0.0) if sizes is not None else r.get(weight) or 0.0
            if isinstance(value, (int, float)) and math.isfinite(value) and n > 0:
                pairs.append((float(value), float(n)))
        if pairs:
            out[name] = sum(v * n for v, n in pairs) / sum(n for _, n in pairs)
    return out


def site_means(rows: list[dict[str, Any]], arm: str, test_sizes: dict[Any, float]) -> dict[str, Any]:
    """summary.json's site means of one arm: ``validation`` (the global model, federated evaluation), and when the
    sites evaluated personalised models, ``personalised`` (validation, test shares; the global model's validation
    means over the same sites) beside ``global_on_site_tests`` (the global model on the same sites' test shares,
    evaluated at the centre): both models over the sites that evaluated a personalised model; ``selected_round``
    when the arm kept an earlier round's model (the centralized arm too). Otherwise empty for arms without federated
    evaluation (centralized, local-only)."""
    kept = _selected_round(rows, arm)
    val = _last_rows(rows, arm, "val", kept)
    out: dict[str, Any] = {}
    if val:
        out["validation"] = weighted_means(val)
    out |= kept_round(rows, arm)
    personal = [r for r in val if PERSONAL_PREFIX + "auc" in r or PERSONAL_TEST_PREFIX + "auc" in r]
    if personal:  # both models over the same sites: those that evaluated a personalised model
        sites = {r["site"] for r in personal}
        out["personalised"] = {
            "sites": len(sites),
            "validation": weighted_means(personal, PERSONAL_PREFIX),
            "global_validation": weighted_means(personal),
            "test": weighted_means(personal, PERSONAL_TEST_PREFIX, weight=PERSONAL_TEST_PREFIX + "num-examples"),
        }
        site_tests = [r for r in _last_rows(rows, arm, "test-site", kept) if r["site"] in sites]
        out["global_on_site_tests"] = weighted_means(site_tests, sizes=test_sizes)
    return out


def personalised_section(summary: dict[str, Any]) -> list[str]:
    """report.md's table of personalised models against the global one (arms with ``personal`` only)."""
    arms = {name: a for name, a in summary["arms"].items() if a.get("personalised")}
    if not arms:
        return []
    lines = ["", "## Personalised models (personal parts kept at each site)", "",
             "Means over the sites, weighted by images, at the last round: the global model and each site's "
             "personalised model (the global one with the site's own personal parts) on the site's share of the "
             "test split, and the personalised model on the site's validation data.", "",
             "| arm | sites | global AUC (sites' test shares) | personalised AUC (sites' test shares) | "
             "personalised AUC (validation) | global AUC (validation) |", "|---|---|---|---|---|---|"]
    for name, a in arms.items():
        p = a["personalised"]
        cells = (a.get("global_on_site_tests", {}).get("auc"), p["test"].get("auc"), p["validation"].get("auc"),
                 p["global_validation"].get("auc"))
        lines.append(f"| {name} | {p['sites']} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells)
                     + " |")
    return lines
