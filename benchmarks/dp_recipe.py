"""Choose the DP fine-tuning recipe on the validation split, never on the test split.

A small grid (learning rate x Poisson batch size x rounds) of federated DP fine-tuning runs at
one epsilon, from the same pretrained encoder, split and delta as `dp_utility.py`. Each run has
fresh ledgers. The selection score is the sites' validation AUC after the last round, averaged
over sites weighted by their validation images (what the server's federated evaluation
records); the test AUC is printed beside it but plays no part in the choice. The winner per
fine-tuning mode is the recipe `medfed simulate --dp finetune` uses by default
(`medfed.config.DP_FINETUNE_RECIPE`).

Tuning on the sites' validation data is itself a use of private data that DP-SGD's epsilon
does not cover (Papernot and Steinke, ICLR 2022): the recipe is chosen once, here, and then
fixed for every deployment, so no site's budget pays for it at run time.

    python benchmarks/dp_recipe.py --encoder ENC          # writes docs/RESULTS.md (dp_recipe)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

from medfed.config import run_config
from medfed.experiment.recorder import Recorder
from medfed.simulations.launcher import simulate as run_experiment


def federated_val_auc(rows: list[dict], rnd: int) -> float:
    """Validation AUC of the global model after round ``rnd``: sites' AUCs weighted by their val images."""
    val = [r for r in rows if r["split"] == "val" and r["phase"] == "finetune" and r["round"] == rnd
           and r.get("auc") is not None]
    if not val:
        raise ValueError(f"no federated validation AUC recorded for fine-tuning round {rnd}")
    n = sum(r["num-examples"] for r in val)
    return sum(r["auc"] * r["num-examples"] for r in val) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoder", required=True, help="pretrained encoder (safetensors) from dp_utility.py")
    parser.add_argument("--out", default="bench-runs/dp_recipe")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--lrs", default="3e-3,1e-2,3e-2")
    parser.add_argument("--batches", default="64,128")
    parser.add_argument("--rounds", default="10,20")
    parser.add_argument("--max-grad-norms", default="1", help="clipping norms C to try")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    encoder = Path(args.encoder).resolve()
    base = run_config(baselines="none", out_dir=str(out), seed=args.seed, encoder_init=str(encoder), dp="finetune",
                     dp_epsilon=args.epsilon, dp_delta=1e-5)
    grid = list(itertools.product(args.modes.split(","), [float(x) for x in args.lrs.split(",")],
                                  [int(x) for x in args.batches.split(",")], [int(x) for x in args.rounds.split(",")],
                                  [float(x) for x in args.max_grad_norms.split(",")]))
    results: list[dict] = []
    for i, (mode, lr, batch, rounds, clip) in enumerate(grid, 1):
        name = f"{mode}-lr{lr:g}-b{batch}-r{rounds}-c{clip:g}-s{args.seed}"
        cfg = base.replace(finetune_mode=mode, finetune_lr=lr, finetune_batch_size=batch, finetune_rounds=rounds,
                           dp_max_grad_norm=clip,
                           run_name=name, ledger_dir=str(out / "ledgers" / f"{name}-{uuid.uuid4().hex[:8]}"))
        start = time.perf_counter()
        run_dir = run_experiment(cfg)
        rows = Recorder.load(run_dir / "metrics.jsonl")
        test = [r for r in rows if r["split"] == "test" and r["phase"] == "finetune"]
        eps = max(r.get("epsilon", 0.0) for r in rows if r["split"] == "train" and r.get("accepted"))
        r = {"mode": mode, "lr": lr, "batch": batch, "rounds": rounds, "clip": clip,
             "val_auc": federated_val_auc(rows, rounds), "test_auc": test[-1]["auc"], "epsilon": eps,
             "seconds": time.perf_counter() - start}
        results.append(r)
        print(f"[{i}/{len(grid)}] {name}: val AUC {r['val_auc']:.4f} (test {r['test_auc']:.4f}) "
              f"epsilon {eps:.3f} ({r['seconds']:.0f} s)", flush=True)
    best = {m: max((r for r in results if r["mode"] == m), key=lambda r: r["val_auc"]) for m in args.modes.split(",")}
    command = (f"python benchmarks/dp_recipe.py --encoder {os.path.relpath(encoder, Path.cwd())} --modes {args.modes} "
               f"--lrs {args.lrs} --batches {args.batches} --rounds {args.rounds} --epsilon {args.epsilon:g} "
               f"--seed {args.seed}"
               + (f" --max-grad-norms {args.max_grad_norms}" if args.max_grad_norms != "1" else ""))
    lines = [
        (f"## Choosing the DP fine-tuning recipe on the validation split (epsilon {args.epsilon:g}, delta 1e-5)\n\n"
        f"Command: `{command}` (one run, {os.cpu_count()} CPU cores). AdamW, per-example clipping norm C as listed, "
        "noise planned from the budget over the planned rounds, fresh ledgers per run. Selection: the highest "
        "federated validation AUC after the last round (sites' official-val shares, weighted by size). The test AUC "
        "is shown for transparency and was not used."),
        "",
        "| mode | lr | Poisson batch | rounds | clipping C | reached epsilon | val AUC (selects) | test AUC | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mark = " **chosen**" if r is best[r["mode"]] else ""
        lines.append(f"| {r['mode']} | {r['lr']:g} | {r['batch']} | {r['rounds']} | {r['clip']:g} "
                     f"| {r['epsilon']:.3f} | {r['val_auc']:.4f}{mark} | {r['test_auc']:.4f} | {r['seconds']:.0f} |")
    write_section("dp_recipe" if args.max_grad_norms == "1" else "dp_recipe_clipping", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
