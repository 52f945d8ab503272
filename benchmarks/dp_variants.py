"""Variants of DP fine-tuning at one epsilon, judged on validation data, with test shown beside.

Each variant is the DP recipe (`medfed.config.DP_FINETUNE_RECIPE`) with some settings changed, run
``--repeats`` times with fresh ledgers (so fresh DP noise) from a pretrained encoder, on the same
partition as `dp_utility.py` (PneumoniaMNIST, 5 sites, 10 % labels, delta 1e-5). For each run the
global model after the last round is scored on the official validation split (524 images: the
union of the sites' validation shares) and on the official test split. Validation decides; the
test AUC is printed for transparency and must not be used to choose.

A variant is ``name:key=value,key=value`` with RunConfig field names (``encoder_init`` too);
``base`` with no changes is the recipe.

    python benchmarks/dp_variants.py --encoder ENC --variant base: \\
        --variant k4:dp_augment_multiplicity=4 --variant cosine:finetune_lr_schedule=cosine \\
        --variant enc30:encoder_init=ENC30 --repeats 3         # writes docs/RESULTS.md (dp_variants)
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

from medfed.config import RunConfig, run_config
from medfed.data.medmnist import load_medmnist, resolve_data_path
from medfed.models.encoders import InputSpec
from medfed.simulations.launcher import simulate as run_experiment
from medfed.task.algo import evaluate
from medfed.task.model_setup import new_classifier


def parse_variant(text: str) -> tuple[str, dict[str, object]]:
    """``name:key=value,...`` -> (name, changes), values typed like the RunConfig field."""
    name, _, body = text.partition(":")
    types = {key.replace("-", "_"): s.type for key, (_, s) in RunConfig.settings().items()}
    changes: dict[str, object] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"variant {name!r}: {key!r} is not a RunConfig setting")
        kind = {int: int, float: float, bool: lambda v: v.lower() == "true"}.get(types[key], str)
        changes[key] = kind(value)  # type: ignore[operator]
    return name, changes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--encoder", required=True, help="pretrained encoder (safetensors) of dp_utility.py")
    parser.add_argument("--variant", action="append", required=True, help="name:key=value,... (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-runs/dp_variants")
    parser.add_argument("--section", default="dp_variants", help="the docs/RESULTS.md section to write")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    base = run_config(baselines="none", out_dir=str(out), seed=args.seed,
                     encoder_init=str(Path(args.encoder).resolve()), dp="finetune", dp_epsilon=args.epsilon,
                     dp_delta=1e-5)
    data = load_medmnist(resolve_data_path(base.dataset.source, download=False), download=False)
    splits = {name: (data.split(name).images[:], torch.as_tensor(data.split(name).labels))
              for name in ("val", "test")}
    spec = InputSpec(data.channels, data.spatial_shape)
    variants = [parse_variant(v) for v in args.variant]
    results: dict[str, list[dict[str, float]]] = {}
    for name, changes in variants:
        for rep in range(args.repeats):
            run_name = f"{name}-r{rep}-{uuid.uuid4().hex[:6]}"
            cfg = base.replace(**changes, run_name=run_name, ledger_dir=str(out / "ledgers" / run_name))  # type: ignore[arg-type]
            start = time.perf_counter()
            run_dir = run_experiment(cfg)
            from safetensors.torch import load_file

            model = new_classifier(cfg, spec, data.task, data.num_classes, None)
            model.load_state_dict(load_file(str(run_dir / "arms" / "federated-simclr" / "final_model.safetensors")))
            summary = json.loads((run_dir / "summary.json").read_text())["arms"]["federated-simclr"]["test"]
            row = {"val": evaluate(model, *splits["val"])["auc"], "test": evaluate(model, *splits["test"])["auc"],
                   "calibrated-accuracy": summary.get("calibrated-accuracy", float("nan")),
                   "seconds": time.perf_counter() - start}
            results.setdefault(name, []).append(row)
            print(f"{run_name}: val AUC {row['val']:.4f} test AUC {row['test']:.4f} ({row['seconds']:.0f} s)",
                  flush=True)

    def stat(rows: list[dict[str, float]], key: str) -> str:
        values = [r[key] for r in rows]
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"

    command = (f"python benchmarks/dp_variants.py --encoder {os.path.relpath(args.encoder, Path.cwd())} "
               + " ".join(f"--variant {v}" for v in args.variant)
               + f" --repeats {args.repeats} --epsilon {args.epsilon:g} --seed {args.seed}"
               + (f" --section {args.section}" if args.section != "dp_variants" else ""))
    lines = [
        f"## DP fine-tuning variants at epsilon {args.epsilon:g}, judged on validation (PneumoniaMNIST, 5 sites, "
        "10 % labels, delta 1e-5)",
        "",
        f"Command: `{command}` (one run, {os.cpu_count()} CPU cores). Every run: fresh ledgers (fresh DP noise), the "
        "DP recipe with the variant's changes, the global model after the last round scored on the official "
        "validation split (decides) and the official test split (shown, not used to choose). Mean +- sd over runs.",
        "",
        "| variant | changes | val AUC (decides) | test AUC | test accuracy at the calibrated threshold "
        "| wall s (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, changes in variants:
        rows = results[name]
        shown = ", ".join(f"{k}={os.path.relpath(str(v), Path.cwd()) if k == 'encoder_init' else v}"
                          for k, v in changes.items()) or "the recipe"
        lines.append(f"| {name} | {shown} | {stat(rows, 'val')} | {stat(rows, 'test')} | "
                     f"{stat(rows, 'calibrated-accuracy')} | {statistics.mean(r['seconds'] for r in rows):.0f} |")
    lines.append("")
    lines.append("Per run (val, test): " + "; ".join(
        f"{name}: " + ", ".join(f"({r['val']:.4f}, {r['test']:.4f})" for r in results[name])
        for name, _ in variants) + ".")
    write_section(args.section, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
