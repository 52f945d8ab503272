"""Everything issue 15 measures on a GPU, in one short call (tested on the CPU with ``--quick``).

1. **SSL pretraining throughput**: medfed's site loop (`SiteAlgo.pretrain_round`: images read from the site's
   store a batch at a time, moved to the device pinned and non-blocking, augmented there) against a plain PyTorch
   loop with the same SimCLR model, batch and augmentations whose whole train split already sits on the device.
   Images per second over one epoch after a warm-up epoch; target: medfed at least 0.8x the plain loop. Both in
   fp32 and under medfed's default precision on that device (bf16 autocast on a GPU).
2. **DP-SGD step over non-DP step** for fine-tuning the default CNN and the ViT, for each per-example gradient
   mode (Opacus hooks, functorch, ghost clipping; expanded weights for the CNN): seconds per step of
   `dp_train_loop` over seconds per step of `train_loop` at the same expected batch; target at most 1.5x.
3. **bf16 keeps the numbers**: three fine-tuning rounds at one site in fp32 and under bf16 autocast from the same
   start; the validation AUCs side by side.
4. **A whole default `medfed simulate`** on the device against the same command with ``--device cpu`` on the same
   machine (``--skip-default-run`` leaves it out).

On the device machine (Python 3.12, its own CUDA torch; the data travel inside the repo)::

    sh benchmarks/gpu_wheels.sh          # here, once: the wheels the device image lacks (.whl) and the data (.gpu-data)
    # there (carry .whl and .gpu-data):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/gpu_check.py --data-dir .gpu-data --out $OUT --skip-default-run
    python benchmarks/gpu_check.py --from-json OUT/gpu_check.json      # here: into docs/RESULTS.md

The default-run comparison needs Ray, whose wheel does not fit the device tool's carry limit: run it on a GPU
machine with medfed installed (without ``--skip-default-run``).

On this CPU machine: ``python benchmarks/gpu_check.py --device cpu --quick --no-write`` (the same code path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section

from medfed.config import RunConfig, run_config
from medfed.data.medmnist import load_medmnist
from medfed.data.partition import SiteSplit
from medfed.data.site import SiteData, site_from_own_file, site_from_split
from medfed.data.transforms import AugmentSpec, augment
from medfed.devices import describe_device, library_versions, resolve_device, to_device, use_bf16
from medfed.privacy.dp_sgd import DPStepSettings, PoissonSchedule, dp_train_loop
from medfed.selfsup.registry import build_method
from medfed.task.algo import SiteAlgo, TrainSettings, train_loop
from medfed.task.model_setup import generator, new_classifier, new_encoder, ssl_settings

SECTION = "gpu_check"
COMMAND = "python3 benchmarks/gpu_check.py --data-dir .gpu-data --out $OUT --skip-default-run"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ssl_throughput(cfg: RunConfig, site: SiteData, device: torch.device, epochs: int) -> dict[str, float]:
    """Images per second of medfed's pretraining round and of a plain loop (same model, batch, views)."""
    algo = SiteAlgo(cfg, site, device=device)
    state = new_encoder(cfg, site.spec).state_dict()
    algo.pretrain_round(state, None, 1)  # warm-up: kernels, cuDNN's algorithm search, the page cache
    _sync(device)
    start = time.perf_counter()
    for rnd in range(epochs):
        algo.pretrain_round(state, None, rnd + 2)
    _sync(device)
    medfed_s = time.perf_counter() - start

    method = build_method(cfg.ssl.methods, cfg.ssl.method_weights, new_encoder(cfg, site.spec), ssl_settings(cfg))
    method = method.to(device).train()
    images = to_device(site.train_images[torch.arange(len(site.train_images))], device)  # all of it, up front
    optimiser = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=cfg.ssl.lr,
                                  weight_decay=1e-4)
    gen = generator(0, "plain-loop")
    half = use_bf16(cfg.compute.precision, device, private=False)
    batch = cfg.ssl.batch

    def epoch() -> None:
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            x = images[order[i:i + batch].to(device)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
                loss = method.loss(x, gen)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

    epoch()
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        epoch()
    _sync(device)
    plain_s = time.perf_counter() - start
    n = epochs * (len(images) // batch) * batch
    return {"medfed_images_per_s": n / medfed_s, "plain_images_per_s": n / plain_s, "ratio": plain_s / medfed_s}


def dp_step_ratio(cfg: RunConfig, site: SiteData, device: torch.device, steps: int) -> dict[str, float]:
    """Seconds per DP-SGD step over seconds per plain step, fine-tuning the classifier, per gradient mode."""
    batch = cfg.finetune_recipe.batch_size
    images, labels = site.labelled_images, site.labelled_labels
    n = len(images)

    def model_and_loss() -> tuple[torch.nn.Module, Any, Any]:
        model = new_classifier(cfg, site.spec, site.task, site.num_classes, None).to(device).train()
        gen = generator(0, "dp-bench")

        def logits_and_labels(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = augment(to_device(images[idx], device), AugmentSpec.light(), gen)
            return model(x), to_device(labels[idx], device)

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            return model.loss(*logits_and_labels(idx))

        def per_example_loss(idx: torch.Tensor) -> torch.Tensor:  # ghost clipping, as SiteAlgo.finetune_round
            return torch.func.vmap(lambda z, y: model.loss(z[None], y[None]))(*logits_and_labels(idx))

        return model, batch_loss, per_example_loss

    def plain() -> float:
        model, batch_loss, _ = model_and_loss()
        settings = TrainSettings(epochs=1, batch_size=batch, lr=1e-3, drop_last=True)
        train_loop(list(model.parameters()), batch_loss, min(n, batch * 3), settings, generator(1))  # warm-up
        _sync(device)
        stats = train_loop(list(model.parameters()), batch_loss, min(n, batch * steps), settings, generator(2))
        _sync(device)
        return stats.seconds / max(1, stats.steps)

    def private(mode: str) -> float:
        model, batch_loss, per_example = model_and_loss()
        schedule = PoissonSchedule(min(1.0, batch / n), steps)
        dp = DPStepSettings(1.0, 1.0, schedule, mode)
        dp_train_loop(model, list(model.parameters()), batch_loss, n, DPStepSettings(1.0, 1.0,
                      PoissonSchedule(schedule.sample_rate, 3), mode), lr=1e-3, weight_decay=1e-4, gen=generator(3),
                      per_example_loss=per_example)
        _sync(device)
        model, batch_loss, per_example = model_and_loss()
        stats = dp_train_loop(model, list(model.parameters()), batch_loss, n, dp, lr=1e-3, weight_decay=1e-4,
                              gen=generator(4), per_example_loss=per_example)
        _sync(device)
        return stats.seconds / max(1, stats.steps)

    base = plain()
    modes = ["hooks", "functorch", "ghost"] + (["ew"] if cfg.model.encoder != "vit" else [])
    out = {"plain_step_s": base}
    for mode in modes:
        out[f"{mode}_ratio"] = private(mode) / base
    return out


def bf16_keeps_numbers(cfg: RunConfig, site: SiteData, device: torch.device, rounds: int) -> dict[str, float]:
    """Validation AUC after ``rounds`` fine-tuning rounds in fp32 and under bf16 autocast, from one start."""
    aucs = {}
    for precision in ("fp32", "bf16"):
        c = cfg.replace(precision=precision)
        algo = SiteAlgo(c, site, device=device)
        state = new_classifier(c, site.spec, site.task, site.num_classes, None).state_dict()
        for rnd in range(1, rounds + 1):
            shared, _ = algo.finetune_round(state, rnd)
            state.update(shared)
        aucs[precision] = float(algo.evaluate_val(state)["auc"])
    return {"fp32_val_auc": aucs["fp32"], "bf16_val_auc": aucs["bf16"], "rounds": rounds,
            "labelled": len(site.labelled_images)}


def default_run(device: str, data_dir: Path, limit: int) -> float:
    """Wall seconds of `medfed simulate` with its defaults and ``--device``; NaN past ``limit`` seconds."""
    out = Path(tempfile.mkdtemp(prefix="medfed-gpu-check-"))
    env = {**os.environ, "MEDFED_DATA_PATH": str(data_dir.resolve())}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "medfed.cli", "simulate", "--device", device, "--out-dir", str(out)],
                            env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        code = -1
    shutil.rmtree(out, ignore_errors=True)
    return time.perf_counter() - start if code == 0 else float("nan")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    data_dir = Path(args.data_dir)
    pneumonia = load_medmnist(data_dir / "pneumoniamnist.npz")
    site = site_from_own_file(pneumonia, site_id=0, label_fraction=1.0, seed=0)
    quick = args.quick
    width = 8 if quick else 16
    base = run_config(data="pneumoniamnist", width=width, pretrain_batch_size=32 if quick else 128,
                      device=args.device)
    small = site
    if quick:  # a slice of the site: the same code, seconds on a CPU
        small = site_from_split(pneumonia, SiteSplit(0, list(range(256)), list(range(128)), list(range(64))))
    results: dict[str, Any] = {"device": describe_device(device), "libraries": library_versions(),
                               "python": platform.python_version(), "quick": quick}
    parts = set(args.parts)
    if "ssl" in parts:
        results["ssl_fp32"] = ssl_throughput(base.replace(precision="fp32"), small, device, 1 if quick else 2)
        results["ssl_default_precision"] = ssl_throughput(base, small, device, 1 if quick else 2)
    steps = 4 if quick else 30
    if "dp" in parts:
        results["dp_cnn"] = dp_step_ratio(base.replace(pretrain="none", finetune_batch_size=32), small, device, steps)
        vit = run_config(data="pneumoniamnist", encoder="vit", pretrain="none", finetune_batch_size=32,
                         device=args.device)
        results["dp_vit"] = dp_step_ratio(vit, small, device, steps)
    if "bf16" in parts:
        results["bf16"] = bf16_keeps_numbers(base.replace(pretrain="none"), small, device, 1 if quick else 3)
    if "default" in parts and not args.skip_default_run:
        results["default_run_s"] = {args.device: default_run(args.device, data_dir, args.run_limit),
                                    "cpu": default_run("cpu", data_dir, args.run_limit)}
    return results


def render(r: dict[str, Any], command: str = COMMAND) -> str:
    d = r["device"]
    libs = ", ".join(f"{k} {v}" for k, v in r["libraries"].items() if v != "not installed")
    lines = [
        "## On a GPU: pretraining throughput, DP-SGD step cost, bf16, the default run" if d["device"] != "cpu"
        else "## bf16 autocast against fp32 (measured on the CPU)",
        "",
        f"Command: `{command}`. "
        f"Device: `{d['device']}` {d.get('name', '')} ({d.get('memory_gib', '?')} GiB, CUDA {d.get('cuda', '-')}, "
        f"cuDNN {d.get('cudnn', '-')}); Python {r['python']}; {libs}." + (" QUICK (tiny sizes)." if r["quick"] else ""),
        "",
    ]
    if "ssl_fp32" in r:
        lines += ["| measure | medfed | plain PyTorch | medfed / plain (target >= 0.8) |", "|---|---|---|---|"]
    for key, label in (("ssl_fp32", "SimCLR pretraining, fp32 (images/s)"),
                       ("ssl_default_precision", "SimCLR pretraining, precision auto (images/s)")):
        if key not in r:
            continue
        s = r[key]
        lines.append(f"| {label} | {s['medfed_images_per_s']:.0f} | {s['plain_images_per_s']:.0f} | "
                     f"{s['ratio']:.2f} |")
    if "dp_cnn" in r:
        lines += ["", "| model | plain step (ms) | DP step / plain step, per gradient mode (target <= 1.5) |",
                  "|---|---|---|"]
    for key, label in (("dp_cnn", "CNN (default)"), ("dp_vit", "ViT")):
        if key not in r:
            continue
        s = r[key]
        modes = ", ".join(f"{k.removesuffix('_ratio')} {v:.2f}x" for k, v in s.items() if k.endswith("_ratio"))
        lines.append(f"| {label} | {1000 * s['plain_step_s']:.1f} | {modes} |")
    if "bf16" in r:
        b = r["bf16"]
        lines += ["", f"bf16 autocast against fp32, same start and seed, {b.get('rounds', 3)} fine-tuning rounds at "
                  f"one site (PneumoniaMNIST, {b.get('labelled', '?')} labelled images), then its validation AUC: fp32 "
                  f"{b['fp32_val_auc']:.4f}, bf16 {b['bf16_val_auc']:.4f}."]
    if "default_run_s" in r:
        runs = r["default_run_s"]
        lines.append("Default `medfed simulate` on this machine: " + ", ".join(
            f"`--device {k}` {v:.0f} s" for k, v in runs.items()) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/medmnist"))
    parser.add_argument("--out", default="", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a test of the script, not a measurement")
    parser.add_argument("--skip-default-run", action="store_true")
    parser.add_argument("--parts", nargs="+", default=["ssl", "dp", "bf16", "default"],
                        choices=["ssl", "dp", "bf16", "default"], help="what to measure")
    parser.add_argument("--section", default=SECTION, help="the docs/RESULTS.md section to write")
    parser.add_argument("--run-limit", type=int, default=240, help="seconds each default run may take")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/RESULTS.md")
    parser.add_argument("--from-json", default="", help="render a gpu_check.json measured elsewhere into RESULTS.md")
    args = parser.parse_args()
    results = json.loads(Path(args.from_json).read_text()) if args.from_json else measure(args)
    command = COMMAND if args.from_json or args.device != "cpu" else "python " + " ".join(
        ["benchmarks/gpu_check.py", *sys.argv[1:]])
    text = render(results, command)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
        (out / "gpu_check.md").write_text(text + "\n")
    if not args.no_write and (args.from_json or not args.out):
        write_section(args.section, text)
    print(text)


if __name__ == "__main__":
    main()
