"""Choose federated SSL and few-label fine-tuning settings on the validation split (one data set, one seed).

For every pretraining variant (FedAvg, FedEMA or FedU aggregation of SimCLR or BYOL...) the encoder is
pretrained once, federated, then fine-tuned federated with every fine-tuning variant (cross-entropy, logit-adjusted
loss, linear-probe rounds first, personal head...) at every labelled fraction; supervised training from scratch
runs with the same fine-tuning variants. Each run records the global model's validation AUC (mean over the
sites' validation data, federated evaluation, weighted by images: what a choice is made on) and its test AUC on
the official test split (reported, never chosen on); with personal parts also the personalised models' AUC.

Writes a table and the command into docs/RESULTS.md (section ``ssl_recipes-<data>-s<seed>``).

    python benchmarks/ssl_recipes.py --seed 2 --set pretrain-rounds=30
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from medfed.config import RunConfig
from medfed.constants import NO_PRETRAIN, Mode
from medfed.experiment.arms import Arm
from medfed.simulations.launcher import simulate as run_experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
PRETRAIN_VARIANTS = ["fedavg-simclr:pretrain=simclr", "fedema-simclr:pretrain=simclr,ssl-aggregation=fedema",
                     "fedavg-byol:pretrain=byol", "fedu-byol:pretrain=byol,ssl-aggregation=fedu"]
FINETUNE_VARIANTS = ["ce:", "logit-adjusted:finetune-loss=logit-adjusted", "probe5:finetune-probe-rounds=5",
                     "personal-head:personal=head"]


def parse_value(value: str) -> Any:
    try:
        return json.loads(value)  # numbers and booleans
    except json.JSONDecodeError:
        return value


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value,key=value`` -> (name, overrides)."""
    name, _, body = text.partition(":")
    pairs = [item.partition("=") for item in body.split(",") if item]
    return name, {k: parse_value(v) for k, _, v in pairs}


def run_one(cfg: RunConfig, arm: Arm) -> tuple[Path, dict[str, Any]]:
    run_dir = run_experiment(cfg, arms=[arm])
    return run_dir, json.loads((run_dir / "summary.json").read_text())["arms"][arm.name]


def row(pretrain: str, finetune: str, fraction: float, entry: dict[str, Any], pretrain_s: float) -> dict[str, Any]:
    personal = entry.get("personalised", {})
    return {"pretrain": pretrain, "finetune": finetune, "fraction": fraction,
            "val_auc": entry.get("validation", {}).get("auc"), "test_auc": entry["test"].get("auc"),
            "personal_test_auc": personal.get("test", {}).get("auc"),
            "global_site_test_auc": entry.get("global_on_site_tests", {}).get("auc"),
            "finetune_s": entry["wall_seconds"], "pretrain_s": pretrain_s}


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "pneumoniamnist.npz"))
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument("--pretrain", nargs="+", default=PRETRAIN_VARIANTS, metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--finetune", nargs="+", default=FINETUNE_VARIANTS, metavar="NAME:KEY=VALUE,...")
    parser.add_argument("--no-scratch", action="store_true", help="skip supervised training from scratch")
    parser.add_argument("--out-dir", default="runs/benchmarks/ssl_recipes")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--json", default="", help="also write the rows to this file (after every run)")
    parser.add_argument("--from-json", default="", help="write the section from this file's rows, running nothing "
                        "(a run stopped early: say so with --note)")
    parser.add_argument("--note", default="", help="a sentence added to the section (e.g. what was not run)")
    args = parser.parse_args()
    if args.from_json:
        base = RunConfig.from_flat({**RunConfig().to_flat(), **{k: parse_value(v) for k, _, v in (
            item.partition("=") for item in args.set)}, "data": args.data, "seed": args.seed})
        write(args, base, json.loads(Path(args.from_json).read_text()), minutes=None)
        return

    common = {k: parse_value(v) for k, _, v in (item.partition("=") for item in args.set)}
    base = RunConfig.from_flat({**RunConfig().to_flat(), **common, "data": args.data, "out-dir": args.out_dir,
                                "seed": args.seed, "baselines": "none"})
    finetunes = [parse_variant(v) for v in args.finetune]
    rows: list[dict[str, Any]] = []
    started = time.time()

    def finetune_all(label: str, pretrain_cfg: RunConfig, arm: Arm, encoder: str, pretrain_s: float) -> None:
        for fraction in args.fractions:
            for ft_name, ft in finetunes:
                cfg = pretrain_cfg.replace(label_fraction=fraction, encoder_init=encoder,
                                           run_name=f"{label}-{ft_name}-f{fraction}-s{args.seed}", **{
                                               k.replace("-", "_"): v for k, v in ft.items()})
                _, entry = run_one(cfg, arm)
                rows.append(row(label, ft_name, fraction, entry, pretrain_s))
                print(f"[ssl_recipes] {rows[-1]}", flush=True)
                Path(args.json or os.devnull).write_text(json.dumps(rows, indent=1))

    for text in args.pretrain:
        label, overrides = parse_variant(text)
        cfg = base.replace(**{k.replace("-", "_"): v for k, v in overrides.items()})
        arm = Arm(Mode.FEDERATED.value, cfg.ssl.method)
        # pretraining once (with one fine-tuning round: a run ends fine-tuned), then every fine-tuning variant
        started_pretraining = time.time()
        run_dir, _ = run_one(cfg.replace(finetune_rounds=1, run_name=f"{label}-pretrain-s{args.seed}"), arm)
        encoder = str(run_dir / "arms" / arm.name / "pretrained_encoder.safetensors")
        print(f"[ssl_recipes] pretrained {label}: {encoder}", flush=True)
        finetune_all(label, cfg, arm, encoder, time.time() - started_pretraining)
    if not args.no_scratch:
        finetune_all("from scratch", base.replace(pretrain=NO_PRETRAIN), Arm(Mode.FEDERATED.value, NO_PRETRAIN),
                     "", 0.0)

    write(args, base, rows, minutes=(time.time() - started) / 60)


def write(args: argparse.Namespace, base: RunConfig, rows: list[dict[str, Any]], minutes: float | None) -> None:
    """The RESULTS.md section of ``rows``, with the command that made them."""
    argv, shown = sys.argv[1:], []
    while argv:  # the benchmark's own command: without the options that only rewrite its section
        item = argv.pop(0)
        if item in ("--from-json", "--note"):
            argv.pop(0)
        else:
            shown.append(item)
    command = "python benchmarks/ssl_recipes.py " + " ".join(shlex.quote(a) for a in shown)
    name = Path(args.data).stem
    lines = [f"## Choosing federated SSL and fine-tuning settings on validation: {name}, seed {args.seed}", "",
             f"Command: `{command}`" + (" (these rows: its `--json` file, written after every run)"
                                        if minutes is None else ""),
             f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, torch {torch.__version__}"
             + (f", total {minutes:.1f} min" if minutes is not None else "") + ". " + (args.note + " " if args.note
                                                                                      else "")
             + f"{base.dataset.num_sites} sites, {base.dataset.partition} "
             f"alpha {base.dataset.alpha}, pretraining {base.ssl.rounds} rounds x {base.ssl.epochs} epochs, "
             f"fine-tuning {base.finetune_recipe.rounds} rounds, width {base.model.width}. Each pretraining variant "
             "pretrains once and every fine-tuning variant fine-tunes that encoder (its wall time excludes "
             "pretraining). Validation AUC: the global model on the sites' validation data (federated evaluation, "
             "last round, mean weighted by images): choices are made on it. Test AUC: official test split, "
             "reported only. Personalised: the sites' own models on their test shares (beside the global model on "
             "the same shares).", "",
             "| labels | pretraining | fine-tuning | validation AUC | test AUC | personalised AUC (site tests) | "
             "global AUC (site tests) | fine-tune s | pretrain s |", "|---|---|---|---|---|---|---|---|---|"]
    for fraction in args.fractions:
        chosen = [r for r in rows if r["fraction"] == fraction]
        best = max((r for r in chosen if r["val_auc"] is not None), key=lambda r: r["val_auc"], default=None)
        for r in chosen:
            mark = " **(best on validation)**" if r is best else ""
            lines.append(f"| {fraction:.0%} | {r['pretrain']} | {r['finetune']}{mark} | {fmt(r['val_auc'])} | "
                         f"{fmt(r['test_auc'])} | {fmt(r['personal_test_auc'])} | {fmt(r['global_site_test_auc'])} | "
                         f"{r['finetune_s']:.0f} | {r['pretrain_s']:.0f} |")
        lines.append("")
    write_section(f"ssl_recipes-{name}-s{args.seed}", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
