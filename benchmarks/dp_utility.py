"""Utility under DP, and what each site sends per round: PneumoniaMNIST, 5 sites, 10 % labels.

One federated SimCLR pretraining run (no DP; its exposure is listed by `medfed audit`) gives
an encoder; every arm then fine-tunes it federatedly with DP-SGD at the sites (delta 1e-5,
the noise multiplier planned from each site's budget over the planned rounds, RDP
accountant, clipping 1) at epsilon 1, 3 and 8, fully or with LoRA adapters (rank 4), plus
the same two modes without DP for reference. Each arm has fresh ledgers. The test AUC is the
global model's on the official test split after the last round; epsilon is the max over
sites of what they reported. Bytes per site per round come from the server's records of the
replies (uplink: what leaves a site).

    python benchmarks/dp_utility.py                # writes docs/RESULTS.md (dp_utility, communication)
    python benchmarks/dp_utility.py --quick        # 2 pretraining / 3 fine-tuning rounds, to check it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

from medfed.config import DP_FINETUNE_RECIPE, FINETUNE_RECIPE, RunConfig, run_config
from medfed.experiment.recorder import Recorder
from medfed.simulations.launcher import simulate as run_experiment

EPSILONS = (1.0, 3.0, 8.0)
MODES = ("full", "lora")


def run(cfg: RunConfig) -> tuple[Path, dict]:
    start = time.perf_counter()
    run_dir = run_experiment(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = Recorder.load(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["split"] == "train" and r.get("accepted")]
    fine = [r for r in train if r["phase"] == "finetune"]
    arm = next(iter(summary["arms"].values()))
    return run_dir, {
        "auc": arm["test"]["auc"],
        "accuracy": arm["test"]["accuracy"],
        # at the threshold calibrated on the sites' pooled validation histograms (medfed.task.calibration)
        "threshold": arm["test"].get("threshold", float("nan")),
        "calibrated": tuple(arm["test"].get(f"calibrated-{k}", float("nan"))
                            for k in ("accuracy", "sensitivity", "specificity")),
        "epsilon": (max((r.get("epsilon", 0.0) for r in fine), default=0.0)
                    if cfg.privacy.scope != "none" else float("inf")),
        "sigma": [r["noise-multiplier"] for r in fine if "noise-multiplier" in r],
        "refused": sum(1 for r in rows if r.get("refused")),
        "bytes_finetune": max((r["bytes-sent"] for r in fine), default=0),
        "bytes_pretrain": max((r["bytes-sent"] for r in train if r["phase"] == "pretrain"), default=0),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench-runs/dp_utility")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES), help="fine-tuning modes (full, lora, linear)")
    parser.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS))
    parser.add_argument("--no-reference", action="store_true", help="skip the non-DP reference arms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm (fresh DP noise each): mean and sd")
    parser.add_argument("--encoder", default="",
                        help="reuse a pretrained encoder (safetensors) of an earlier run of this script")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    rounds = dict(pretrain_rounds=2, finetune_rounds=3) if args.quick else {}
    base = run_config(baselines="none", out_dir=str(out), seed=args.seed, **rounds)  # type: ignore[arg-type]
    if args.encoder:
        encoder = Path(args.encoder).resolve()
        pre_dir = encoder.parents[2]
        rows = Recorder.load(pre_dir / "metrics.jsonl")
        pre = {"bytes_pretrain": max(r["bytes-sent"] for r in rows if r["phase"] == "pretrain" and r.get("bytes-sent"))}
    else:
        pre_dir, pre = run(base.replace(run_name=f"pretrain-s{args.seed}", finetune_rounds=1))
        encoder = pre_dir / "arms" / "federated-simclr" / "pretrained_encoder.safetensors"
        print(f"pretrained encoder: {encoder} ({pre['seconds']:.0f} s)", flush=True)
    results: dict[tuple[str, str], dict] = {}
    modes = args.modes.split(",")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    arms = [(mode, eps, rep) for mode in modes for eps in ([] if args.no_reference else [None]) + epsilons
            for rep in range(args.repeats)]
    for mode, eps, rep in arms:
        name = (f"{mode}-{'nodp' if eps is None else f'eps{eps:g}'}-s{args.seed}"
                + (f"-r{rep}" if args.repeats > 1 else ""))
        cfg = base.replace(encoder_init=str(encoder), finetune_mode=mode, run_name=name)
        if eps is not None:
            # fresh ledgers for every arm of every invocation: a budget spent by an earlier (or aborted)
            # invocation must not shrink this one's
            ledgers = out / "ledgers" / f"{name}-{uuid.uuid4().hex[:8]}"
            cfg = cfg.replace(dp="finetune", dp_epsilon=eps, dp_delta=1e-5, ledger_dir=str(ledgers))
        _, results[(mode, name)] = run(cfg)
        r = results[(mode, name)]
        sig = f"{min(r['sigma']):.3g}-{max(r['sigma']):.3g}" if r["sigma"] else "-"
        print(f"{name}: AUC {r['auc']:.4f} epsilon {r['epsilon']:.3f} sigma {sig} ({r['seconds']:.0f} s)", flush=True)
    flags = "--quick " if args.quick else ""
    command = f"python benchmarks/dp_utility.py {flags}--seed {args.seed}"
    if modes != list(MODES) or epsilons != list(EPSILONS) or args.no_reference:
        command += (f" --modes {args.modes} --epsilons {args.epsilons}"
                    + (" --no-reference" if args.no_reference else ""))
    if args.repeats > 1:
        command += f" --repeats {args.repeats}"
    if args.encoder:  # the pretraining step of an earlier run of this same script, reused
        command += f" --encoder {os.path.relpath(encoder, Path.cwd())}"
    lines = [
        f"## Utility under DP (PneumoniaMNIST, 5 sites, 10 % labels, delta 1e-5)\n\nCommand: `{command}` "
        f"(one run, {os.cpu_count()} CPU cores). Encoder: federated SimCLR pretraining without DP "
        f"({base.ssl.rounds} rounds; uncovered exposure, listed by `medfed audit`), then "
        "federated fine-tuning with DP-SGD at every site (noise planned from the budget, RDP accountant, "
        "clipping 1, Poisson sampling) with the DP recipe of each mode, chosen on validation data (`dp_recipe`: "
        + "; ".join(f"{m} lr {r.lr:g}, batch {r.batch_size}, {r.rounds} rounds" for m, r in DP_FINETUNE_RECIPE.items()
                    if m in modes)
        + f"; without DP: lr {FINETUNE_RECIPE.lr:g}, batch {FINETUNE_RECIPE.batch_size}, "
        f"{FINETUNE_RECIPE.rounds} rounds). "
        "Target: AUC >= 0.93 at epsilon 8. The decision threshold is calibrated each round on the sites' pooled "
        "validation score histograms (Youden's J; `medfed.task.calibration`), never on test.",
        "",
        "| fine-tuning | target epsilon | reached epsilon (max over sites) | noise multiplier (range over sites) "
        "| test AUC"
        + (f" (mean +- sd over {args.repeats} runs)" if args.repeats > 1 else "")
        + " | accuracy at 0.5 | calibrated threshold | accuracy / sensitivity / specificity at it | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for (mode, name), r in results.items():
        groups.setdefault((mode, name.split("-")[1]), []).append(r)
    for (mode, arm), rs in groups.items():
        target = "no DP" if arm == "nodp" else arm.removeprefix("eps")
        reached = "-" if arm == "nodp" else f"{max(r['epsilon'] for r in rs):.3f}"
        sigmas = [x for r in rs for x in r["sigma"]]
        sigma = "-" if not sigmas else f"{min(sigmas):.3g}-{max(sigmas):.3g}"
        aucs = [r["auc"] for r in rs]
        auc = f"{aucs[0]:.4f}" if len(aucs) == 1 else (
            f"{statistics.mean(aucs):.4f} +- {statistics.stdev(aucs):.4f} ({', '.join(f'{a:.4f}' for a in aucs)})")
        acc = statistics.mean(r["accuracy"] for r in rs)
        secs = statistics.mean(r["seconds"] for r in rs)
        threshold = statistics.mean(r["threshold"] for r in rs)
        calibrated = " / ".join(f"{statistics.mean(r['calibrated'][i] for r in rs):.4f}" for i in range(3))
        lines.append(f"| {mode} | {target} | {reached} | {sigma} | {auc} | {acc:.4f} | {threshold:.4f} "
                     f"| {calibrated} | {secs:.0f} |")
    default = modes == list(MODES)
    write_section("dp_utility" if default else f"dp_utility_{'_'.join(modes)}", "\n".join(lines))
    if not default:
        print("\n".join(lines))
        return
    full = next(r for (m, _), r in results.items() if m == "full")
    lora = next(r for (m, _), r in results.items() if m == "lora")
    comm = [
        f"## Communication: bytes each site sends per round\n\nCommand: `{command}` (from the server's records of "
        "every reply; float32 arrays, uplink).",
        "",
        "| what a site sends | bytes per site per round | ratio to the full encoder |",
        "|---|---|---|",
        f"| pretraining: encoder | {pre['bytes_pretrain']:,} | 1 |",
        f"| fine-tuning, full: encoder + head | {full['bytes_finetune']:,} "
        f"| {full['bytes_finetune'] / pre['bytes_pretrain']:.4f} |",
        f"| fine-tuning, LoRA rank 4: adapters + head | {lora['bytes_finetune']:,} | "
        f"{lora['bytes_finetune'] / pre['bytes_pretrain']:.4f} "
        f"(1/{pre['bytes_pretrain'] / lora['bytes_finetune']:.1f}) |",
        "",
        "Target: LoRA sends at most 1/20 of the full encoder.",
    ]
    write_section("communication", "\n".join(comm))
    print("\n".join(lines + [""] + comm))


if __name__ == "__main__":
    main()
