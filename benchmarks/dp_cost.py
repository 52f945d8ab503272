"""Cost of DP-SGD: time per training step with Opacus against the same step without DP.

Same model (the default CNN classifier, or with LoRA adapters), same batch, same AdamW, in
one process; steps of every variant are interleaved round-robin so machine noise hits all of
them alike, and the ratio DP / non-DP is taken from medians. Opacus' per-example gradient
modes: ``hooks`` (module hooks, Opacus' default), ``functorch`` (vmap'd per-sample grads),
``ew`` (PyTorch expanded weights) and ``ghost`` (ghost clipping: per-example norms without
materialising per-example gradients, Li et al. 2022 / Bu et al. 2023). Fixed batches
(no Poisson sampling) so every variant processes the same number of examples.

    python benchmarks/dp_cost.py                 # CPU
    python benchmarks/dp_cost.py --device cuda   # GPU (when one is available)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

from medfed.config import run_config
from medfed.constants import TaskType
from medfed.models.encoders import InputSpec
from medfed.task.model_setup import new_classifier

MODES = ("hooks", "functorch", "ew", "ghost")


def build(finetune_mode: str, device: str) -> nn.Module:
    cfg = run_config(pretrain="none", finetune_mode=finetune_mode, encoder="cnn")
    return new_classifier(cfg, InputSpec(1, (28, 28)), TaskType.BINARY, 2, None).to(device)


def make_step(kind: str, finetune_mode: str, batch: int, device: str):
    """A closure doing one optimisation step of ``kind`` ('plain' or an Opacus mode)."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = build(finetune_mode, device)
    x = torch.rand(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    if kind == "plain":
        def step() -> None:
            optimiser.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimiser.step()
        return step
    loader = DataLoader(TensorDataset(x.cpu(), y.cpu()), batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimiser, criterion=criterion, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=kind,
        )
    if kind == "ghost":
        dp_model, dp_opt, dp_crit, _ = made
    else:
        dp_model, dp_opt, _ = made
        dp_crit = criterion

    def dp_step() -> None:
        dp_opt.zero_grad(set_to_none=True)
        dp_crit(dp_model(x), y).backward()
        dp_opt.step()

    return dp_step


def measure(device: str, batch: int, finetune_mode: str, rounds: int) -> dict[str, float]:
    """Median ms per step of every variant (interleaved)."""
    steps: dict[str, object] = {}
    errors: dict[str, str] = {}
    for kind in ("plain", *MODES):
        try:
            fn = make_step(kind, finetune_mode, batch, device)
            for _ in range(3):
                fn()  # warm-up (and a check that the mode runs on this model)
            steps[kind] = fn
        except Exception as exc:  # a mode that cannot handle this model is reported, not fatal
            errors[kind] = f"{type(exc).__name__}: {str(exc)[:120]}"
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for kind, fn in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            if device == "cuda":
                torch.cuda.synchronize()
            times[kind].append(time.perf_counter() - start)
    result = {k: statistics.median(v) * 1000 for k, v in times.items()}
    result.update({f"{k}-error": v for k, v in errors.items()})  # type: ignore[dict-item]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"Device: {device_name}; torch {torch.__version__}. Median of {args.rounds} interleaved steps per variant; "
        "ratio = DP step / non-DP step on the same model and batch (noise multiplier 1, clipping 1, AdamW).",
        "",
        "| model | batch | non-DP ms/step | " + " | ".join(f"{m} ms (ratio)" for m in MODES) + " |",
        "|---|---|---|" + "---|" * len(MODES),
    ]
    notes = []
    for finetune_mode in ("full", "lora"):
        for batch in (int(b) for b in args.batches.split(",")):
            r = measure(args.device, batch, finetune_mode, args.rounds)
            cells = []
            for m in MODES:
                if m in r:
                    cells.append(f"{r[m]:.1f} ({r[m] / r['plain']:.2f}x)")
                else:
                    cells.append("failed")
                    notes.append(f"{finetune_mode} batch {batch} {m}: {r.get(f'{m}-error')}")
            lines.append(f"| CNN {finetune_mode} | {batch} | {r['plain']:.1f} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    if notes:
        lines += ["", "Modes that failed on a model:"] + [f"- {n}" for n in notes]
    command = f"python benchmarks/dp_cost.py --device {args.device} --rounds {args.rounds} --batches {args.batches}" + (
        f" --threads {args.threads}" if args.threads else "")
    text = f"## Cost of DP-SGD ({args.device})\n\nCommand: `{command}`\n\n" + "\n".join(lines)
    write_section(f"dp_cost_{args.device}", text)
    print(text)


if __name__ == "__main__":
    main()
