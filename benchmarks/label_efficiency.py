"""Label-efficiency benchmark: federated SSL against its alternatives on PneumoniaMNIST.

For each labelled fraction and seed, one experiment runs four arms on the same partition
(5 sites, Dirichlet alpha 0.5), the same labelled subsets and the same seed:

* federated SSL (SimCLR pretraining on every site's images, then federated fine-tuning),
* centralized SSL (the same, on all sites' data pooled),
* local-only supervised (each site alone, from scratch; mean over sites),
* supervised from scratch (federated fine-tuning without pretraining).

Writes mean and standard deviation over seeds, per-run wall time and peak memory, the
targets and the command into docs/RESULTS.md (between this benchmark's markers).

    python benchmarks/label_efficiency.py --set pretrain-rounds=30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medfed.config import RunConfig
from medfed.constants import NO_PRETRAIN, Mode
from medfed.experiment.arms import Arm
from medfed.simulations.launcher import simulate as run_experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "fpr")


def arms(ssl: str) -> list[tuple[str, Arm]]:
    return [
        ("federated SSL", Arm(Mode.FEDERATED.value, ssl)),
        ("centralized SSL", Arm(Mode.CENTRALIZED.value, ssl)),
        ("local-only supervised (mean over sites)", Arm(Mode.LOCAL_ONLY.value, NO_PRETRAIN)),
        ("supervised from scratch (federated)", Arm(Mode.FEDERATED.value, NO_PRETRAIN)),
    ]


ORDER = [label for label, _ in arms("simclr")]


def mean_sd(values: list[float], digits: int = 3) -> str:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return "n/a"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1) if arr.size > 1 else 0.0:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"
    parser.add_argument("--data", default=str(default_data),
                        help="MedMNIST flag or file (default: the pinned copy in ../shared/data/medmnist)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-dir", default="runs/benchmarks/label_efficiency")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="RunConfig overrides in flat form, e.g. pretrain-rounds=20")
    args = parser.parse_args()

    overrides: dict[str, object] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)  # numbers and booleans
        except json.JSONDecodeError:
            overrides[key] = value
    base = RunConfig.from_flat({**RunConfig().to_flat(), **overrides, "data": args.data, "out-dir": args.out_dir})

    results: dict[float, dict[str, list[dict]]] = {}
    started = time.time()
    for seed in args.seeds:
        first: dict[str, Path] = {}  # arm label -> pretrained encoder of this seed's first fraction
        first_split: list[list[int]] | None = None
        for fraction in args.fractions:
            cfg = base.replace(label_fraction=fraction, seed=seed, run_name=f"frac{fraction}-seed{seed}")
            chosen = arms(cfg.ssl.method)
            print(f"[label_efficiency] fraction {fraction} seed {seed}", flush=True)
            if not first:
                runs = [(run_experiment(cfg, arms=[a for _, a in chosen]), chosen)]
                for label, arm in chosen:
                    if arm.pretrain != NO_PRETRAIN:
                        first[label] = runs[0][0] / "arms" / arm.name / "pretrained_encoder.safetensors"
            else:
                # Same seed -> same partition -> the same pretraining: reuse it, fine-tune at this fraction.
                runs = [(run_experiment(cfg.replace(run_name=f"{cfg.output.run_name}-supervised"),
                                        arms=[a for _, a in chosen if a.pretrain == NO_PRETRAIN]),
                         [c for c in chosen if c[1].pretrain == NO_PRETRAIN])]
                for label, arm in chosen:
                    if arm.pretrain != NO_PRETRAIN:
                        reuse = cfg.replace(encoder_init=str(first[label]),
                                            run_name=f"{cfg.output.run_name}-{arm.mode}")
                        runs.append((run_experiment(reuse, arms=[arm]), [(label, arm)]))
            for run_dir, labelled_arms in runs:
                split = [s["train"] for s in json.loads((run_dir / "split.json").read_text())["sites"]]
                first_split = first_split or split
                if split != first_split:
                    raise SystemExit(f"partition differs between fractions for seed {seed}: cannot reuse pretraining")
                summary = json.loads((run_dir / "summary.json").read_text())["arms"]
                for label, arm in labelled_arms:
                    entry = summary[arm.name]
                    results.setdefault(fraction, {}).setdefault(label, []).append(
                        {**entry["test"], "wall": entry["wall_seconds"], "peak": entry["peak_memory_mb"], "seed": seed,
                         "reused": fraction != args.fractions[0] and arm.pretrain != NO_PRETRAIN}
                    )

    command = "python benchmarks/label_efficiency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "## Label efficiency on PneumoniaMNIST (issue: federated SSL end to end)",
        "",
        f"Command: `{command}`",
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, total {(time.time() - started) / 60:.1f} min. Settings: "
        f"{base.dataset.num_sites} sites, {base.dataset.partition} alpha {base.dataset.alpha}, "
        f"pretrain {base.ssl.method} {base.ssl.rounds} rounds x {base.ssl.epochs} epochs "
        f"(batch {base.ssl.batch}), "
        f"fine-tune {base.finetune.mode} {base.finetune.rounds} rounds x {base.finetune.epochs} epochs, "
        f"width {base.model.width}, seeds {args.seeds}.",
        "Test metrics on the official test split (624 images), mean ± standard deviation over seeds.",
        f"Pretraining depends on the seed only (the partition is drawn before the labelled subsets), so the SSL "
        f"arms at {', '.join(f'{f:.0%}' for f in args.fractions[1:])} labels fine-tune the encoders pretrained in the "
        f"{args.fractions[0]:.0%} runs of the same seed (checked: identical partitions); their wall time excludes "
        "pretraining.",
        "",
    ]
    for fraction, by_arm in results.items():
        lines += [f"### {fraction:.0%} labels", "",
                  "| arm | AUC | accuracy | sensitivity | specificity | FPR | wall time (s) | peak memory (MB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for label in ORDER:
            runs = by_arm[label]
            lines.append(f"| {label} | " + " | ".join(mean_sd([r[m] for r in runs]) for m in METRICS)
                         + f" | {mean_sd([r['wall'] for r in runs], 0)} | {mean_sd([r['peak'] for r in runs], 0)} |")
        fed = np.mean([r["auc"] for r in by_arm["federated SSL"]])
        cen = np.mean([r["auc"] for r in by_arm["centralized SSL"]])
        loc = np.mean([r["auc"] for r in by_arm["local-only supervised (mean over sites)"]])
        lines += ["", f"Targets at this fraction: federated SSL AUC {fed:.3f}"
                  + (f" (target >= 0.95: {'met' if fed >= 0.95 else 'missed'})" if abs(fraction - 0.1) < 1e-9 else "")
                  + f"; federated - centralized {fed - cen:+.3f} "
                  f"(target within 0.01: {'met' if abs(fed - cen) <= 0.01 else 'missed'}"
                  + f"); federated - local-only {fed - loc:+.3f} "
                  f"(target >= +0.05: {'met' if fed - loc >= 0.05 else 'missed'}).", ""]
    lines += ["Per-run numbers (seed: AUC, wall s):", ""]
    for fraction, by_arm in results.items():
        for label in ORDER:
            runs = by_arm[label]
            lines.append(f"- {fraction:.0%} {label}: " + ", ".join(
                f"s{r['seed']}: {r['auc']:.3f}, {r['wall']:.0f}s" + (" (pretraining reused)" if r["reused"] else "")
                for r in runs))
    write_section("label_efficiency", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
