"""Round by round: each fine-tuning round's validation AUC (what ``finetune-select best-validation`` chooses on)
and test AUC (reported, never chosen on) of finished runs, read from their metrics.jsonl; writes a docs/RESULTS.md
section (a table, the kept round marked) and a plot beside it.

Validation AUC: the global model's federated evaluation, the mean over the sites' validation shares weighted by
images (sites whose share has one class have no AUC and are left out), exactly what the run chose on. Test AUC:
the global model on the official test split. Only federated runs (the standalone arms evaluate validation inside the
arm and record no per-round validation rows).

    python benchmarks/round_curves.py runs/le16sel/pneumoniamnist-e3-ft4-f0.01-s1 \\
        runs/le16sel/pneumoniamnist-scratch-f0.01-s2 --section finetune_round_curves
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from medfed.experiment.site_means import weighted_means

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import RESULTS, write_section


def curves(run_dir: Path, arm: str = "") -> tuple[dict[int, float], dict[int, float], int | None]:
    """(round -> validation AUC, round -> test AUC, the kept round or None) of the fine-tuning phase of federated
    arm ``arm`` in ``run_dir`` (empty: the run's only federated arm).

    Raises:
        SystemExit: no metrics.jsonl, no federated fine-tuning rows in it, or several federated arms and no ``arm``.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (not a finished run directory)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    federated = sorted({r["arm"] for r in rows if r.get("split") == "val"})
    if not arm:
        if len(federated) > 1:
            raise SystemExit(f"{run_dir}: federated arms {', '.join(federated)}: name one with --arm")
        arm = federated[0] if federated else ""
    val_rows: dict[int, list[dict[str, Any]]] = {}
    test: dict[int, float] = {}
    kept = None
    for r in rows:
        if r.get("arm") != arm or r.get("phase") != "finetune" or r.get("accepted", True) is False:
            continue
        auc = r.get("auc")
        if r["split"] == "val":
            val_rows.setdefault(r["round"], []).append(r)
        elif r["split"] == "test" and r["site"] == "global" and isinstance(auc, (int, float)) and math.isfinite(auc):
            test[r["round"]] = float(auc)
        elif r["split"] == "selected" and r["site"] == "global":
            kept = int(r["round"])
    means = {rnd: weighted_means(group).get("auc") for rnd, group in sorted(val_rows.items())}
    val = {rnd: auc for rnd, auc in means.items() if auc is not None}
    if not val:
        raise SystemExit(f"{run_dir}: no federated validation rows{f' of arm {arm}' if arm else ''} (a standalone "
                         "arm, or no fine-tuning)")
    return val, test, kept


def table(runs: list[tuple[str, dict[int, float], dict[int, float], int | None]]) -> list[str]:
    rounds = sorted({rnd for _, val, test, _ in runs for rnd in (*val, *test) if rnd > 0})
    head = "| round | " + " | ".join(f"{name}: validation | test" for name, *_ in runs) + " |"
    lines = [head, "|---|" + "---|---|" * len(runs)]
    for rnd in rounds:
        cells = []
        for _, val, test, kept in runs:
            mark = "**" if rnd == kept else ""
            cells += [f"{mark}{val[rnd]:.3f}{mark}" if rnd in val else "n/a",
                      f"{mark}{test[rnd]:.3f}{mark}" if rnd in test else "n/a"]
        lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
    return lines


def plot(runs: list[tuple[str, dict[int, float], dict[int, float], int | None]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (name, val, test, kept) in zip(axes[0], runs, strict=True):
        ax.plot(list(val), list(val.values()), marker="o", ms=3, label="validation (chosen on)")
        ax.plot([r for r in test if r > 0], [v for r, v in test.items() if r > 0], marker="s", ms=3,
                label="test (reported)")
        if kept is not None:
            ax.axvline(kept, color="grey", ls="--", lw=1, label=f"kept: round {kept}")
        last = max(val)
        ax.axvline(last, color="red", ls=":", lw=1, label=f"last: round {last}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("fine-tuning round")
        ax.set_ylabel("AUC")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (one federated arm each)")
    parser.add_argument("--arm", default="", help="the federated arm to read (default: the runs' only one)")
    parser.add_argument("--section", default="finetune_round_curves")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = [(run.name, *curves(run, args.arm)) for run in args.runs]
    figure = args.results.parent / "figures" / f"{args.section}.png"
    plot(runs, figure)
    command = "python benchmarks/round_curves.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = "\n".join([
        f"## Fine-tuning round by round: validation and test AUC ({args.section})", "",
        f"Command: `{command}` (reads the runs' metrics.jsonl; no training). Validation AUC: the global model's "
        "federated evaluation, mean over the sites' validation shares weighted by images (what `finetune-select "
        "best-validation` chooses on); test AUC: the official test split (reported, never chosen on). Bold: the "
        "round the run kept.", "",
        f"![validation and test AUC per round](figures/{figure.name})", "",
        *table(runs)])
    write_section(args.section, text, args.results)
    print(text)


if __name__ == "__main__":
    main()
