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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import RESULTS, write_section


def curves(run_dir: Path) -> tuple[dict[int, float], dict[int, float], int | None]:
    """(round -> validation AUC, round -> test AUC, the kept round or None) of the fine-tuning phase of the one
    federated arm in ``run_dir``.

    Raises:
        SystemExit: no metrics.jsonl, or no federated fine-tuning rows in it.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (not a finished run directory)")
    pairs: dict[int, list[tuple[float, float]]] = {}
    test: dict[int, float] = {}
    kept = None
    for line in path.read_text().splitlines():
        r: dict[str, Any] = json.loads(line)
        if r.get("phase") != "finetune" or r.get("accepted", True) is False:
            continue
        auc = r.get("auc")
        finite = isinstance(auc, (int, float)) and math.isfinite(auc)
        if r["split"] == "val" and finite and r.get("num-examples"):
            pairs.setdefault(r["round"], []).append((float(auc), float(r["num-examples"])))
        elif r["split"] == "test" and r["site"] == "global" and finite:
            test[r["round"]] = float(auc)
        elif r["split"] == "selected":
            kept = int(r["round"])
    val = {rnd: sum(a * n for a, n in p) / sum(n for _, n in p) for rnd, p in sorted(pairs.items())}
    if not val:
        raise SystemExit(f"{run_dir}: no federated validation rows (a standalone arm, or no fine-tuning)")
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
    parser.add_argument("--section", default="finetune_round_curves")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = [(run.name, *curves(run)) for run in args.runs]
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
