"""``report.md`` and PNG plots for a finished run directory."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medfed.constants import MetricKey
from medfed.data.partition import SIZE_COLUMNS, size_distribution
from medfed.experiment.model_selection import SELECTED_SPLIT
from medfed.experiment.site_means import personalised_section
from medfed.privacy.plots import plot_epsilon
from medfed.task.calibration import CALIBRATED, THRESHOLD

METRIC_COLUMNS = ("auc", "accuracy", "sensitivity", "specificity", "fpr")
SITE_TABLE_MAX = 50  # sites listed one per row in report.md; beyond, their size distribution only



def calibrated_section(summary: dict) -> list[str]:
    """The arms' test metrics at the threshold calibrated on validation data (binary tasks;
    `medfed.task.calibration`)."""
    arms = {name: arm["test"] for name, arm in summary["arms"].items() if THRESHOLD in arm["test"]}
    if not arms:
        return []
    lines = ["", "## At the decision threshold calibrated on validation data", "",
             "The threshold maximises sensitivity + specificity - 1 (Youden's J) on the validation split: for "
             "federated arms the sites' pooled score histograms of the last round (federated evaluation), for "
             "baselines their own validation data. The test split plays no part in choosing it. It is saved in the "
             "final model's metadata (`threshold`).", "",
             "| arm | threshold p(positive) | accuracy | sensitivity | specificity | FPR |",
             "|---|---|---|---|---|---|"]
    for name, t in arms.items():
        lines.append(f"| {name} | {_fmt(t[THRESHOLD])} | " + " | ".join(_fmt(t.get(CALIBRATED[MetricKey(k)])) for k in
                                                                   METRIC_COLUMNS[1:]) + " |")
    return lines

def selected_section(rows: list[dict], rounds: int) -> list[str]:
    """The fine-tuning round each arm (each site, for local-only) kept under ``finetune-select best-validation``."""
    kept = [r for r in rows if r.get("split") == SELECTED_SPLIT]
    if not kept:
        return []
    said = ", ".join(f"{r['arm']}{'' if r['site'] == 'global' else ' site ' + str(r['site'])}: round {r['round']}"
                     + (f" (validation AUC {r['validation-auc']:.3f})" if "validation-auc" in r else
                        " (no round had a validation AUC: the last)") for r in kept)
    return ["", f"Models kept (finetune-select best-validation, the round of {rounds} whose model scored the highest "
                f"validation AUC; the table above reports that model): {said}."]


def sizes_section(data_info: dict) -> list[str]:
    """The sites' sizes: how many train, labelled, val and test images each got (min, quartiles, max) and how many
    have no val split; the per-site table follows only up to `SITE_TABLE_MAX` sites (data.json lists every site)."""
    if not data_info["sites"]:  # a deployment: each site holds its own data
        return ["", "## Sites", "", "Each site holds its own data: their sizes are not known to the server."]
    dist = data_info.get("site_sizes") or size_distribution(data_info["sites"])
    without = (f"{dist['sites_without_val']} without a validation split (federated evaluation evaluates those on "
               "their share of the test split, recorded as `test-share`, outside the decision threshold and the "
               "validation metrics)" if dist["sites_without_val"] else "each with a validation split")
    lines = ["", "## Sites", "", f"{dist['sites']} sites; {without}.", "",
             "| images per site | min | 25% | median | 75% | max |", "|---|---|---|---|---|---|"]
    for key in SIZE_COLUMNS:
        q = dist[key]
        lines.append(f"| {key} | {q['min']:g} | {q['q1']:g} | {q['median']:g} | {q['q3']:g} | {q['max']:g} |")
    if dist["sites"] > SITE_TABLE_MAX:
        lines += ["", f"More than {SITE_TABLE_MAX} sites: each site's counts are in `data.json` (`sites`), its images "
                  "in `split.json`."]
    return lines


def _skipped(data_info: dict) -> str:
    """The rows `--on-bad-case skip` left out (unreadable, or the later of an image in two splits), if any."""
    rows = data_info.get("notes", {}).get("skipped_rows", [])
    if not rows:
        return ""
    shown = ", ".join(map(str, rows[:20])) + (f" and {len(rows) - 20} more" if len(rows) > 20 else "")
    return f" Left out (on-bad-case skip): {len(rows)} row(s) of the table: {shown}."


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


MAX_SITE_LINES = 20
"""Past this many sites in a panel the loss plot shows each round's mean and range instead of a line per site."""


def plot_losses(rows: list[dict], path: Path) -> Path | None:
    """Training loss per site per round: one panel per (arm, phase) that has site rows."""
    series: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("split") == "train" and r.get("train-loss") is not None and r.get("accepted", True):
            series[(r["arm"], r["phase"])][str(r["site"])].append((r["round"], r["train-loss"]))
    if not series:
        return None
    panels = sorted(series)
    cols = min(2, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 3.6 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):
        if len(series[key]) > MAX_SITE_LINES:  # many sampled sites: the round's mean and range, not a line each
            by_round: dict[int, list[float]] = defaultdict(list)
            for points in series[key].values():
                for rnd, loss in points:
                    by_round[rnd].append(loss)
            xs = sorted(by_round)
            ax.fill_between(xs, [min(by_round[x]) for x in xs], [max(by_round[x]) for x in xs], alpha=0.25,
                            label="range over the round's sites")
            ax.plot(xs, [float(np.mean(by_round[x])) for x in xs], marker="o", ms=3,
                    label=f"mean ({len(series[key])} sites sampled in all)")
        else:
            for site, points in sorted(series[key].items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=f"site {site}")
        ax.set_title(f"{key[0]} - {key[1]}")
        ax.set_xlabel("round")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_test_auc(rows: list[dict], path: Path) -> Path | None:
    """Test AUC per fine-tuning round for every arm (local-only: mean over sites); a star on the round an arm kept
    (``finetune-select best-validation``)."""
    by_arm: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    kept = {r["arm"]: r["round"] for r in rows if r.get("split") == SELECTED_SPLIT and r.get("site") == "global"}
    for r in rows:
        if r.get("split") == "test" and r.get("auc") is not None:
            by_arm[r["arm"]][r["round"]].append(r["auc"])
    if not by_arm:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, rounds in sorted(by_arm.items()):
        xs = sorted(rounds)
        (line,) = ax.plot(xs, [sum(rounds[x]) / len(rounds[x]) for x in xs], marker="o", ms=3, label=arm)
        if kept.get(arm) in rounds:
            k = kept[arm]
            ax.plot([k], [sum(rounds[k]) / len(rounds[k])], marker="*", ms=14, ls="none", color=line.get_color(),
                    label=f"{arm}: kept (best validation)")
    ax.set_xlabel("fine-tuning round (0 = before fine-tuning)")
    ax.set_ylabel("test AUC (official test split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _last_round_per_site(rows: list[dict], split: str) -> dict[tuple[str, int], dict]:
    last: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r.get("split") != split or r.get("accepted") is False:
            continue
        key = (r["arm"], r["site"])
        if key not in last or r["round"] >= last[key]["round"]:
            last[key] = r
    return last


def privacy_section(rows: list[dict], cfg: dict, plots: Path) -> list[str]:
    """Epsilon per site per round as the server received it (the aggregate is the max, never a mean)."""
    private = [r for r in rows if r.get("split") == "train" and r.get("epsilon") is not None]
    if cfg.get("dp", "none") == "none":
        return ["", "## Privacy", "", "No DP-SGD at the sites in this run (`--dp none`): every weight update that "
                "left a site is uncovered exposure at the example level. See `medfed audit`."]
    lines = ["", "## Privacy: epsilon per site per round (as reported to the server)", "",
             f"DP-SGD at the sites for: {cfg['dp']}; budget per site epsilon {cfg['dp-epsilon']}, "
             f"delta {cfg['dp-delta']} ({cfg['dp-accountant']} accountant, clipping {cfg['dp-max-grad-norm']}). "
             "Unit of privacy: one training image of a site. Cumulative across rounds and runs (each site's ledger). "
             "The federation's epsilon is the max over sites. A round marked R was refused by the site (its reason "
             "is listed under 'Rejected or failed site updates'); `-` means the site was not asked.", ""]
    by_panel: dict[tuple[str, str], dict[int, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    offset: dict[str, int] = {}
    for r in rows:
        if r.get("split") != "train" or r.get("epsilon") is None and not r.get("refused"):
            continue
        cell = "R" if r.get("refused") else _fmt(r["epsilon"])
        by_panel[(r["arm"], r["phase"])][r["round"]][r["site"]] = cell
    for r in private:
        if r.get("refused"):
            continue
        key = r["arm"]
        if r["phase"] == "pretrain":
            offset[key] = max(offset.get(key, 0), r["round"])
    for r in private:
        if r.get("refused"):
            continue
        x = r["round"] + (offset.get(r["arm"], 0) if r["phase"] == "finetune" else 0)
        series[f"{r['arm']} site {r['site']}"].append((x, float(r["epsilon"])))
    for (arm, phase), per_round in sorted(by_panel.items()):
        sites = sorted({s for cells in per_round.values() for s in cells}, key=str)
        lines += [f"**{arm}, {phase}**", "", "| round | " + " | ".join(f"site {s}" for s in sites) + " | max |",
                  "|---|" + "---|" * (len(sites) + 1)]
        for rnd in sorted(per_round):
            cells = per_round[rnd]
            values = [float(c) for c in cells.values() if c not in ("R", "n/a")]
            lines.append(f"| {rnd} | " + " | ".join(cells.get(s, "-") for s in sites)
                         + f" | {_fmt(max(values)) if values else 'n/a'} |")
        lines.append("")
    png = plot_epsilon(series, {k: float(cfg["dp-epsilon"]) for k in series}, plots / "epsilon_per_site.png",
                       xlabel="round (pretraining rounds, then fine-tuning rounds)", title="privacy spent per site")
    if png:
        lines.append(f"![epsilon per site per round](plots/{png.name})")
    return lines


def server_privacy_section(rows: list[dict], cfg: dict) -> list[str]:
    """Secure aggregation and central DP, composed with the sites' own (example-level) accounting."""
    secagg = cfg.get("secure-aggregation", "none") == "secagg+"
    central = cfg.get("central-dp", "none") != "none"
    if not secagg and not central:
        return []
    lines = ["", "## Server-side protection: secure aggregation and central DP", ""]
    if secagg:
        lines.append("**SecAgg+** (Flower's SecAggPlusWorkflow): the server received each round only the sum of the "
                     f"sites' shared weights (each site weight 1; shares {cfg['secagg-num-shares']:g}, threshold "
                     f"{cfg['secagg-threshold']:g} of the sites sampled; values quantised over "
                     f"+-{cfg['secagg-clipping-range']:g}). "
                     "Individual updates could not be checked or screened; each site's metrics arrived in the clear.")
        lines.append("")
    if not central:
        return lines
    releases = [r for r in rows if r.get("split") == "central-dp"]
    sampled = float(cfg.get("fraction-train", 1.0)) < 1
    how = (f"each site drawn independently with probability q = {cfg['fraction-train']:g} every round (Poisson, "
           "a CSPRNG), the clipped updates summed and divided by the expected count q N, Gaussian noise of std "
           "z x C / (q N), accounted at sampling rate q (DP-FedAvg, McMahan et al. 2018)" if sampled
           else "unweighted mean, Gaussian noise of std z x C / n")
    lines += [f"**Central DP** ({cfg['central-dp']}): each site's update clipped to L2 norm "
              f"{cfg['central-dp-clipping-norm']:g}, {how}, with "
              f"z = {cfg['central-dp-noise-multiplier']:g}. Unit of privacy: one whole site (site-level DP); "
              "cumulative over every aggregate released (the server's signed ledger "
              f"`ledgers/<arm>/central.ledger.sqlite`, RDP, delta {cfg['central-dp-delta']:g}).", "",
              f"| arm | phase | round | {'sites summed' if sampled else 'sites averaged'} | noise std | site-level "
              "epsilon |", "|---|---|---|---|---|---|"]
    for r in releases:
        lines.append(f"| {r['arm']} | {r['phase']} | {r['round']} | {int(r.get('sites', 0))} "
                     f"| {_fmt(r.get('noise-std'))} | {_fmt(r.get('central-epsilon'))} |")
    final = {r["arm"]: r for r in releases}
    site_eps: dict[str, float] = {}
    for r in rows:
        if r.get("split") == "train" and r.get("epsilon") is not None and not r.get("refused"):
            site_eps[r["arm"]] = max(site_eps.get(r["arm"], 0.0), float(r["epsilon"]))
    lines.append("")
    for arm, r in final.items():
        example = (f"and, from the sites' ledgers, at most epsilon {_fmt(site_eps[arm])} "
                   f"(delta {cfg['dp-delta']:g}) for any one image of a site, as seen by the server"
                   if arm in site_eps else
                   "and no example-level guarantee (no DP-SGD at the sites: the server "
                   + ("saw only the secure sum)" if secagg else "saw every update unprotected)"))
        lines.append(f"- **{arm}**: the released global model is ({_fmt(r.get('central-epsilon'))}, "
                     f"{cfg['central-dp-delta']:g})-DP for any one whole site, {example}. The two guarantees are for "
                     "different units and hold together; they are not added.")
    return lines


def _compute_line(summary: dict) -> list[str]:
    """Where the centre computed: device, its name, precision and the library versions (summary.json "compute")."""
    c = summary.get("compute")
    if not c:
        return []
    libs = ", ".join(f"{k} {v}" for k, v in c.get("libraries", {}).items() if v != "not installed")
    return ["", f"Computed on `{c['device']}` ({c.get('name', '')}), precision {c.get('precision', 'fp32')}; {libs}."]


def write_report(run_dir: Path, summary: dict, rows: list[dict], data_info: dict, title: str | None = None) -> Path:
    """Write report.md (and plots/) into ``run_dir``; ``title`` defaults to the folder name."""
    cfg = summary["config"]
    recipe = summary["finetune-recipe"]  # resolved: the recipe's values for settings left at 0
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    loss_png = plot_losses(rows, plots / "loss_per_site.png")
    auc_png = plot_test_auc(rows, plots / "test_auc_per_round.png")
    lines = [
        f"# medfed run: {title or run_dir.name}",
        "",
        f"Data: `{data_info['name']}` ({data_info['task']}, {data_info['num_classes']} classes, "
        f"{data_info['channels']} channel(s), {'x'.join(map(str, data_info['spatial_shape']))}), "
        f"sha256 `{data_info['sha256'][:16]}...`. "
        + ("Official splits: " if data_info.get("source", "medmnist") == "medmnist" else "Splits: ")
        + ", ".join(f"{k} {v}" for k, v in data_info["sizes"].items())
        + (f" ({data_info['unlabelled']} train cases unlabelled: pretraining only)" if data_info.get("unlabelled")
           else "") + "."
        + _skipped(data_info),
        f"Sites: {cfg['num-sites']} ("
        + (f"natural: the table's hospitals {', '.join(data_info.get('sites_in_table', []))}"
           if cfg["partition"] == "natural" else f"{cfg['partition']}, alpha {cfg['alpha']}")
        + "), labelled fraction "
        f"{cfg['label-fraction']}, seed {cfg['seed']}. Pretraining: {cfg['pretrain']} "
        + (f"(not run here: encoder loaded from `{cfg['encoder-init']}`)" if cfg.get("encoder-init") else
           f"({cfg['pretrain-rounds']} rounds x {cfg['pretrain-epochs']} local epochs)")
        + "; fine-tuning: "
        f"{cfg['finetune-mode']} ({recipe['rounds']} rounds x {cfg['finetune-epochs']} local epochs, "
        f"lr {recipe['lr']:g}, batch {recipe['batch_size']}); "
        f"strategy {cfg['strategy']}.",
        *_compute_line(summary),
        "",
        "## Comparison on the official test split",
        "",
        "Every arm uses the same partition, labelled subsets and seed. Local-only: mean over sites.",
        "Threshold 0.5 (argmax for multi-class). Sensitivity and specificity are those of the positive class "
        "(label 1) for binary tasks and macro one-vs-rest averages for multi-class and multi-label tasks; "
        "FPR = 1 - specificity.",
        "",
        "| arm | mode | pretrain | AUC | accuracy | sensitivity | specificity | FPR | wall time (s) "
        "| peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in summary["arms"].items():
        t = arm["test"]
        lines.append(
            f"| {name} | {arm['mode']} | {arm['pretrain']} | "
            + " | ".join(_fmt(t.get(k)) for k in METRIC_COLUMNS)
            + f" | {arm['wall_seconds']:.1f} | {arm['peak_memory_mb']:.0f} |"
        )
    lines += selected_section(rows, recipe["rounds"])
    lines += calibrated_section(summary)
    lines += personalised_section(summary)
    per_class = ("train images per class" if data_info["task"] != "multi-label"
                 else "train images per first positive label (last: none)")
    named = any("hospital" in s for s in data_info["sites"])
    lines += sizes_section(data_info)
    table = data_info["sites"] if len(data_info["sites"]) <= SITE_TABLE_MAX else []
    if table:
        lines += ["", f"| site | train images | labelled | val images | test share | {per_class} |",
                  "|---|---|---|---|---|---|"]
    for s in table:
        site = f"{s['site']} ({str(s['hospital']).replace('|', '/')})" if named else s["site"]
        unlabelled = f" ({s['unlabelled']} unlabelled)" if s.get("unlabelled") else ""
        lines.append(f"| {site} | {s['train']}{unlabelled} | {s['labelled']} | {s['val']} | {s.get('test', 0)} "
                     f"| {s['train_per_class']} |")
    sites_by_id = {s["site"]: s for s in data_info["sites"]}
    per_site = {name: arm["per_site_test"] for name, arm in summary["arms"].items() if arm.get("per_site_test")}
    if per_site:
        lines += ["", "## Per-site test metrics of models trained at one site alone (whole official test split)", "",
                  "| arm | site | " + " | ".join(METRIC_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(METRIC_COLUMNS)]
        for name, sites in per_site.items():
            for site, m in sites.items():
                lines.append(f"| {name} | {site} | " + " | ".join(_fmt(m.get(k)) for k in METRIC_COLUMNS) + " |")
    for split, title, count in (
        ("test-site", "Per-site test metrics of the global model (last round; each site's share of the official "
                      "test split, cut like its data)", "test images"),
        ("val", "Per-site validation metrics of the global model (last round, federated evaluation)", "val images"),
        ("test-share", "Federated evaluation of sites without validation data (last round; at the site, on its share "
                       "of the test split; not in the decision threshold nor the validation metrics)", "test images"),
    ):
        last = _last_round_per_site(rows, split)
        if not last:
            continue
        lines += ["", f"## {title}", "", f"| arm | site | {count} | " + " | ".join(METRIC_COLUMNS) + " |",
                  "|---|---|---|" + "---|" * len(METRIC_COLUMNS)]
        for (arm, site), r in sorted(last.items()):
            n = sites_by_id.get(site, {}).get("test", "") if split == "test-site" else int(r.get("num-examples") or 0)
            lines.append(f"| {arm} | {site} | {n} | " + " | ".join(_fmt(r.get(k)) for k in METRIC_COLUMNS) + " |")
    lines += privacy_section(rows, cfg, plots)
    lines += server_privacy_section(rows, cfg)
    rejected = [r for r in rows if r.get("accepted") is False]
    lines += ["", "## Rejected or failed site updates", ""]
    lines += [f"- {r['arm']} {r['phase']} round {r['round']} site {r['site']}: {r.get('reason', '')}"
              for r in rejected] or ["None."]
    lines += ["", "## Plots", ""]
    if loss_png:
        lines.append(f"![training loss per site per round](plots/{loss_png.name})")
    if auc_png:
        lines.append(f"![test AUC per round](plots/{auc_png.name})")
    lines += ["", "Files: `config.json` (settings), `split.json` (partition), `metrics.jsonl` (every round), "
              "`summary.json`, `arms/*/` (safetensors checkpoints).", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
