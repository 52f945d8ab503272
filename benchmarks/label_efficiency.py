"""Label-efficiency benchmark: federated SSL against its alternatives, per data set, labelled fraction and seed.

For every data set (default PneumoniaMNIST, BreastMNIST, AdrenalMNIST3D), labelled fraction (default 10 % and
1 %) and seed (default 0, 1, 2), on the same partition (the seed's), the same labelled subsets and the same seed:

* federated SSL, one arm per ``--ssl-variants`` entry ``NAME[@FRACTION/...]:key=value,...`` (RunConfig flat keys
  over the run's settings; default FedAvg of the run's pretraining method, FedEMA, FedU with BYOL, personal norms
  and heads): federated pretraining on every site's images, then federated fine-tuning on the labelled share; a
  variant with ``@FRACTION/...`` runs only at those labelled fractions (e.g. a fine-tuning recipe for 1 % labels,
  ``ft4@0.01:finetune-epochs=4,finetune-lr=0.003``), and competes on validation only there;
* centralized SSL (the run's pretraining method and fine-tuning on all sites' data pooled);
* local-only supervised (each site alone, from scratch; mean over sites);
* federated supervised from scratch (federated fine-tuning without pretraining);
* on ``--dp-datasets`` at ``--dp-fraction``: the federated SSL variant chosen on validation, fine-tuned under
  DP-SGD at ``--dp-epsilon`` (each seed's encoder; fresh ledgers each run; the DP recipe of medfed, with the
  DP arm's own ``--dp-set`` settings over it, e.g. ``finetune-mode=linear``). DP runs of several recipes (files
  merged) are shown apart, and the DP target is judged on the chosen variant's recipe with the highest mean
  validation AUC.

Pretraining depends on the seed, not on the labelled fraction (the partition is drawn before the labelled subsets,
and pretraining uses every train image): each (data set, seed, pretraining settings) pretrains once, in the first
run that needs it, and every later run with the same pretraining settings fine-tunes that encoder (``encoder-init``;
checked: identical partitions). Pretraining settings are every flat setting except the fine-tuning-only ones, with
``personal`` reduced to whether it keeps the norms (which personal norm does during pretraining too), so a variant
that changes only fine-tuning reuses the matching encoder. A reused run's wall time excludes pretraining.

Choices are made on validation, test is reported: per data set and fraction the federated SSL variant with the
highest mean validation AUC (the global model's last-round federated evaluation on the sites' validation shares,
weighted by images) is "federated SSL (chosen on validation)", and the issue's targets are judged on its test AUC
(official test split). Every variant's validation and test AUC are reported too.

``--reuse-encoders`` takes earlier runs' JSON files and fine-tunes their pretrained encoders (same data set, seed
and pretraining settings, the files still on disk) instead of pretraining again: a fine-tuning recipe or DP
variant then costs fine-tuning only. ``--reuse-baselines`` takes earlier runs' JSON files and copies their
centralized, local-only and from-scratch rows where the data set, seed, labelled fraction and every setting of the
run (``--set``, not the variants') are the same, instead of running them again (runs are deterministic: a repeated
baseline reproduces its AUC to the third decimal), so an encoder or recipe variant costs its own runs only.

Writes one docs/RESULTS.md section per data set (``label_efficiency-<data>``) and a JSON file of every run's
numbers; ``--from-json`` rebuilds the sections from one or more such files without running anything (runs done in
pieces: one data set, or some seeds, per invocation).

    MEDFED_DATA_PATH=../shared/data/medmnist python benchmarks/label_efficiency.py --set pretrain-rounds=30
    python benchmarks/label_efficiency.py --datasets ../shared/data/medmnist/breastmnist.npz --seeds 0 1 2 \\
        --set pretrain-rounds=30 --json runs/le-breast.json
    python benchmarks/label_efficiency.py --from-json runs/le-pneumonia.json runs/le-breast.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfed.config import RunConfig
from medfed.constants import NO_PRETRAIN, Mode, PersonalParts
from medfed.exceptions import ConfigError
from medfed.experiment.arms import Arm
from medfed.experiment.phases import PRETRAINED_ENCODER
from medfed.experiment.site_means import weighted_means
from medfed.simulations.launcher import simulate as run_experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import RESULTS, write_section

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"
DEFAULT_DATASETS = [str(SHARED / f"{name}.npz") for name in ("pneumoniamnist", "breastmnist", "adrenalmnist3d")]
DEFAULT_VARIANTS = ["fedavg:", "fedema:ssl-aggregation=fedema", "fedu:pretrain=byol,ssl-aggregation=fedu",
                    "personal:personal=norm+head"]

CENTRALIZED = "centralized SSL"
LOCAL_ONLY = "local-only supervised (mean over sites)"
SCRATCH = "federated supervised from scratch"
BASELINES = {CENTRALIZED: "centralized", LOCAL_ONLY: "local-only", SCRATCH: "scratch"}  # label -> run-name part

# Flat settings that only change fine-tuning (or where a run is written): not part of the pretraining key
# (`personal` enters it as whether it keeps the norms, which personal norm does during pretraining too).
NOT_PRETRAINING = {"label-fraction", "baselines", "mode", "out-dir", "run-name", "encoder-init", "round-timeout",
                   "personal"}
NOT_PRETRAINING_PARTS = {"finetune", "lora"}


# ---- settings ---------------------------------------------------------------------------------------------------
def parse_value(value: str) -> Any:
    try:
        return json.loads(value)  # numbers and booleans
    except json.JSONDecodeError:
        return value


def parse_pairs(items: Iterable[str], what: str) -> dict[str, Any]:
    """``["key=value", ...]`` -> {key: value}, keys in flat (kebab-case) form."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what}: {item!r} is not KEY=VALUE")
        out[key.strip().replace("_", "-")] = parse_value(value)
    return out


@dataclass(frozen=True)
class Variant:
    """One federated SSL arm: its name, flat overrides over the run's settings, and the labelled fractions it runs
    at (empty: every fraction)."""

    name: str
    flat: dict[str, Any]
    fractions: tuple[float, ...] = ()

    def runs_at(self, fraction: float) -> bool:
        return not self.fractions or any(math.isclose(fraction, f) for f in self.fractions)


def parse_variant(text: str, fractions: Iterable[float] = ()) -> Variant:
    """``name[@fraction/fraction]:key=value,key=value`` -> Variant; a fraction must be one of ``fractions``
    (the benchmark's) when those are given."""
    head, _, body = text.partition(":")
    name, at, only = head.partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise SystemExit(f"--ssl-variants {text!r}: the name must be letters, digits, '_', '.', '+' or '-'")
    chosen: list[float] = []
    for item in only.split("/") if at else []:
        try:
            value = float(item)
        except ValueError:
            raise SystemExit(f"--ssl-variants {text!r}: {item!r} after '@' is not a labelled fraction") from None
        if not 0 < value <= 1 or (fractions and not any(math.isclose(value, f) for f in fractions)):
            raise SystemExit(f"--ssl-variants {text!r}: fraction {item} is not one of --fractions "
                             f"{list(fractions)} (a variant must run somewhere)")
        chosen.append(value)
    return Variant(name, parse_pairs(filter(None, body.split(",")), f"--ssl-variants {name}"), tuple(chosen))


def with_flat(cfg: RunConfig, flat: dict[str, Any], what: str) -> RunConfig:
    try:
        return cfg.replace(**{key.replace("-", "_"): value for key, value in flat.items()})
    except ConfigError as exc:
        raise SystemExit(f"{what}: {exc}") from None


def pretraining_key(cfg: RunConfig, mode: str) -> str:
    """What a pretrained encoder depends on: every flat setting but the fine-tuning-only ones, and the mode."""
    settings = RunConfig.settings()
    flat = {key: value for key, value in cfg.to_flat().items()
            if key not in NOT_PRETRAINING and settings[key][0] not in NOT_PRETRAINING_PARTS}
    flat["personal-norm"] = PersonalParts(cfg.federation.personal).norm  # pretrain_round keeps personal norms
    return json.dumps({"mode": mode, **flat}, sort_keys=True, default=str)


def complete_key(key: str) -> str:
    """A pretraining key written before some settings existed, with those settings at their defaults (which is
    what that run had), so it matches the key the same settings give today."""
    if not key:
        return key
    stored = json.loads(key)
    full = json.loads(pretraining_key(RunConfig(), stored.get("mode", "")))
    return json.dumps({**full, **stored}, sort_keys=True, default=str)


def same_settings(flat: dict[str, Any]) -> dict[str, Any]:
    """A run's flat settings without where it writes (compared to reuse an earlier run's baselines); settings
    added to medfed after the run was written take their defaults (which is what the run had)."""
    full = RunConfig.from_flat({**RunConfig().to_flat(), **flat}).to_flat()
    return {k: v for k, v in full.items() if k not in ("out-dir", "run-name")}


def describe_settings(cfg: RunConfig) -> str:
    ssl, ft, recipe = cfg.ssl, cfg.finetune, cfg.finetune_recipe
    return (f"{cfg.dataset.num_sites} sites, {cfg.dataset.partition} alpha {cfg.dataset.alpha:g}, pretraining "
            f"{ssl.method} {ssl.rounds} rounds x {ssl.epochs} epochs (batch {ssl.batch_size or 'auto'}, lr "
            f"{ssl.lr:g}), fine-tuning {ft.mode} {recipe.rounds} rounds x {ft.epochs} epochs (lr {recipe.lr:g}, "
            f"batch {recipe.batch_size}), width {cfg.model.width}")


# ---- running ----------------------------------------------------------------------------------------------------
class Runner:
    """Runs the arms of one data set, pretraining once per (seed, pretraining settings); appends a row per run to
    ``rows``, keeps ``meta`` (the data set's command, machine and settings) up to date and calls ``save``."""

    def __init__(self, stem: str, rows: list[dict[str, Any]], meta: dict[str, Any], save: Callable[[], None]) -> None:
        self.stem, self.rows, self.meta, self.save = stem, rows, meta, save
        self.started = time.time()
        self.encoders: dict[tuple[int, str], str] = {}  # (seed, pretraining key) -> pretrained encoder
        self.partitions: dict[int, list[list[int]]] = {}  # seed -> every site's train indices
        self.baselines: dict[tuple[float, int, str], dict[str, Any]] = {}  # (fraction, seed, arm) -> earlier row

    def reuse(self, earlier: list[dict[str, Any]]) -> int:
        """Take the pretrained encoders of ``earlier`` rows (this data set's, with a ``pretraining_key``, the file
        still there) and their seeds' partitions; returns how many."""
        taken = 0
        for r in earlier:
            key, encoder = complete_key(r.get("pretraining_key") or ""), r.get("encoder")
            if r["dataset"] != self.stem or not r.get("pretrained") or not key or not encoder:
                continue
            if not Path(encoder).is_file():
                print(f"[label_efficiency] {encoder}: gone, that encoder pretrains again", flush=True)
                continue
            self.encoders.setdefault((r["seed"], key), encoder)
            split = Path(r["run_dir"]) / "split.json"
            if split.is_file():
                self.check_partition(Path(r["run_dir"]), r["seed"])
            taken += 1
        return taken

    def reuse_baselines(self, paths: list[str], base: RunConfig) -> int:
        """Take the baseline rows of the JSON files ``paths`` (this data set's) from files whose run of this data set
        had the same settings as ``base`` (every flat setting but where runs are written); returns how many."""
        wanted = same_settings(base.to_flat())
        taken = 0
        for path in paths:
            doc = json.loads(Path(path).read_text())
            if not any(same_settings(m["config"]) == wanted for m in doc["datasets"].get(self.stem, [])):
                print(f"[label_efficiency] {path}: other settings for {self.stem}: its baselines are not reused",
                      flush=True)
                continue
            for r in doc["rows"]:
                if r["dataset"] == self.stem and r["arm"] in BASELINES:
                    self.baselines[(r["fraction"], r["seed"], r["arm"])] = r
                    taken += 1
        return taken

    def baseline(self, cfg: RunConfig, arm: Arm, *, label: str, seed: int, fraction: float) -> dict[str, Any]:
        """A baseline arm: an earlier run's row when ``reuse_baselines`` took one, else run it."""
        if (earlier := self.baselines.get((fraction, seed, label))) is not None:
            row = {**earlier, "reused_from": earlier["run_dir"]}
            self.rows.append(row)
            self.save()
            print(f"[label_efficiency] {self.stem} {fraction:.0%} seed {seed}: {label}: earlier run's row reused "
                  f"(test AUC {fmt(row['test'].get('auc'))})", flush=True)
            return row
        return self.run(cfg, arm, label=label, slug=BASELINES[label], seed=seed, fraction=fraction)

    def run(self, cfg: RunConfig, arm: Arm, *, label: str, slug: str, seed: int, fraction: float,
            variant: str | None = None, overrides: dict[str, Any] | None = None,
            dp_set: dict[str, Any] | None = None) -> dict[str, Any]:
        """One arm in its own run directory; pretrains, or fine-tunes this seed's encoder of the same pretraining
        settings when there is one (or the ``encoder-init`` ``cfg`` names)."""
        key = pretraining_key(cfg, arm.mode) if arm.pretrain != NO_PRETRAIN else ""
        if key and not cfg.model.encoder_init and (seed, key) in self.encoders:
            cfg = cfg.replace(encoder_init=self.encoders[(seed, key)])
        pretrains = bool(key) and not cfg.model.encoder_init
        cfg = cfg.replace(label_fraction=fraction, seed=seed, baselines="none",
                          run_name=f"{self.stem}-{slug}-f{fraction:g}-s{seed}")
        print(f"[label_efficiency] {self.stem} {fraction:.0%} seed {seed}: {label}"
              + (" (pretrained encoder reused)" if key and not pretrains else ""), flush=True)
        run_dir = run_experiment(cfg, arms=[arm])
        self.check_partition(run_dir, seed)
        summary = json.loads((run_dir / "summary.json").read_text())
        entry = summary["arms"][arm.name]
        encoder = cfg.model.encoder_init
        if pretrains:
            encoder = str(run_dir / "arms" / arm.name / PRETRAINED_ENCODER)
            if not Path(encoder).exists():
                raise SystemExit(f"{run_dir}: no {PRETRAINED_ENCODER} for arm {arm.name}: cannot reuse pretraining")
            self.encoders[(seed, key)] = encoder
        personal = entry.get("personalised", {})
        row = {"dataset": self.stem, "fraction": fraction, "seed": seed, "arm": label, "variant": variant,
               "overrides": overrides or {}, "val_auc": entry.get("validation", {}).get("auc"),
               "test": entry["test"], "personal_val_auc": personal.get("validation", {}).get("auc"),
               "personal_test_auc": personal.get("test", {}).get("auc"),
               "global_site_test_auc": entry.get("global_on_site_tests", {}).get("auc"),
               "wall": entry["wall_seconds"], "peak": entry["peak_memory_mb"], "pretrained": pretrains,
               "encoder": encoder, "dp": cfg.privacy.scope != "none", "run_dir": str(run_dir),
               "pretraining_key": key, "last_round_test_auc": last_round_test_auc(run_dir, arm.name)}
        if dp_set:
            row["dp_set"] = dp_set
        self.rows.append(row)
        compute = summary.get("compute", {})
        self.meta.update(
            device=compute.get("device", "?") + (f" ({compute['name']})" if compute.get("name") else ""),
            torch=compute.get("libraries", {}).get("torch", torch.__version__),
            minutes=(time.time() - self.started) / 60)
        self.save()
        print(f"[label_efficiency]   val AUC {fmt(row['val_auc'])}, test AUC {fmt(row['test'].get('auc'))}, "
              f"{row['wall']:.0f} s", flush=True)
        return row

    def check_partition(self, run_dir: Path, seed: int) -> None:
        split = [s["train"] for s in json.loads((run_dir / "split.json").read_text())["sites"]]
        if split != self.partitions.setdefault(seed, split):
            raise SystemExit(f"{run_dir}: the partition differs from this seed's earlier runs: the arms would not "
                             "be compared on the same sites, and pretraining cannot be reused")


def run_dataset(data: str, stem: str, args: argparse.Namespace, overrides: dict[str, Any],
                variants: list[Variant], rows: list[dict[str, Any]],
                metas: dict[str, list[dict[str, Any]]], save: Callable[[], None]) -> None:
    """Every arm of one data set at every fraction and seed, then the DP arm where asked for."""
    base = with_flat(RunConfig.from_flat({**RunConfig().to_flat(), "data": data, "out-dir": args.out_dir}),
                     overrides, f"--set for {stem}")
    if base.model.encoder_init:
        raise SystemExit("encoder-init is managed by this benchmark (pretraining once, reused); do not --set it")
    if base.ssl.method == NO_PRETRAIN:
        raise SystemExit("the run's pretrain method is 'none': set one (e.g. --set pretrain=simclr)")
    configs = {v.name: with_flat(base, v.flat, f"--ssl-variants {v.name} on {stem}") for v in variants}
    for name, cfg in configs.items():
        if cfg.ssl.method == NO_PRETRAIN:
            raise SystemExit(f"--ssl-variants {name}: a federated SSL variant must pretrain (pretrain is 'none')")
    dp_fraction = next((f for f in args.fractions if math.isclose(f, args.dp_fraction)), None)
    do_dp = stem in args.dp_datasets and dp_fraction is not None
    dp_set = dp_settings(args.dp_set)
    dp_flat = {"dp": "finetune", "dp-epsilon": args.dp_epsilon, **dp_set}
    if do_dp:  # refuse a variant that cannot run under DP now, not after hours of runs
        for name, cfg in configs.items():
            with_flat(cfg, dp_flat, f"--ssl-variants {name} under DP (it may be chosen for the DP arm)")
    meta = {"command": "python benchmarks/label_efficiency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "device": "?", "torch": torch.__version__,
            "settings": describe_settings(base), "set": overrides, "config": base.to_flat(), "seeds": args.seeds,
            "fractions": args.fractions, "variants": list(args.ssl_variants),
            "dp": {"epsilon": args.dp_epsilon, "delta": base.privacy.delta, "fraction": dp_fraction, "set": dp_set}
            if do_dp else None,
            "minutes": 0.0}
    metas[stem] = [meta]
    runner = Runner(stem, rows, meta, save)
    if args.reuse_encoders:
        earlier, _ = load(args.reuse_encoders, quiet=True)
        print(f"[label_efficiency] {stem}: {runner.reuse(earlier)} pretrained encoders of earlier runs reused",
              flush=True)
    if args.reuse_baselines:
        print(f"[label_efficiency] {stem}: {runner.reuse_baselines(args.reuse_baselines, base)} baseline runs of "
              "earlier runs reused", flush=True)
    for seed in args.seeds:
        for fraction in args.fractions:
            for v in (v for v in variants if v.runs_at(fraction)):
                runner.run(configs[v.name], Arm(Mode.FEDERATED.value, configs[v.name].ssl.method),
                           label=f"federated SSL: {v.name}", slug=v.name, seed=seed, fraction=fraction,
                           variant=v.name, overrides=v.flat)
            runner.baseline(base, Arm(Mode.CENTRALIZED.value, base.ssl.method), label=CENTRALIZED, seed=seed,
                            fraction=fraction)
            runner.baseline(base, Arm(Mode.LOCAL_ONLY.value, NO_PRETRAIN), label=LOCAL_ONLY, seed=seed,
                            fraction=fraction)
            runner.baseline(base, Arm(Mode.FEDERATED.value, NO_PRETRAIN), label=SCRATCH, seed=seed, fraction=fraction)
    if not do_dp:
        return
    here = [r for r in rows if r["dataset"] == stem and r["fraction"] == dp_fraction]
    chosen = choose(here, configs)
    if chosen is None:
        print(f"[label_efficiency] {stem}: no federated SSL variant has a validation AUC: no DP arm", flush=True)
        return
    for source in sorted((r for r in ssl_rows(here) if r["variant"] == chosen), key=lambda r: r["seed"]):
        cfg = with_flat(configs[chosen], {**dp_flat, "encoder-init": source["encoder"]}, "DP arm")
        runner.run(cfg, Arm(Mode.FEDERATED.value, cfg.ssl.method), label=dp_label(args.dp_epsilon),
                   slug="-".join(["dp", chosen, *(re.sub(r"[^A-Za-z0-9.]+", "-", f"{k}-{v}") for k, v in
                                                  dp_set.items())]),
                   seed=source["seed"], fraction=source["fraction"], variant=chosen,
                   overrides={**next(v.flat for v in variants if v.name == chosen), **dp_flat}, dp_set=dp_set)


def dp_settings(items: list[str]) -> dict[str, Any]:
    """``--dp-set`` as flat settings; refuses the settings the DP arm sets itself."""
    dp_set = parse_pairs(items, "--dp-set")
    if own := sorted({"dp", "dp-epsilon", "encoder-init"} & set(dp_set)):
        raise SystemExit(f"--dp-set {', '.join(own)}: dp, dp-epsilon and encoder-init are the DP arm's own "
                         "(--dp-epsilon; the encoder is each seed's chosen variant's)")
    return dp_set


def dp_label(epsilon: float) -> str:
    return f"federated SSL (chosen on validation) + DP-SGD fine-tuning, epsilon {epsilon:g}"


def dp_recipe(row: dict[str, Any]) -> str:
    """The DP arm's own settings of a DP row (``--dp-set``), as shown in its table label; empty: medfed's recipe
    unchanged (rows written before ``--dp-set`` existed included)."""
    return ",".join(f"{k}={v}" for k, v in (row.get("dp_set") or {}).items())


def choose_dp(rows: list[dict[str, Any]]) -> str | None:
    """Among the DP rows of one variant, the ``dp_recipe`` with the highest mean validation AUC (ties: the
    earlier); None without DP rows."""
    best: tuple[float, str] | None = None
    for recipe in dict.fromkeys(dp_recipe(r) for r in rows):
        val = mean(r["val_auc"] for r in rows if dp_recipe(r) == recipe)
        if best is None or (val is not None and val > best[0]):
            best = (val if val is not None else -math.inf, recipe)
    return best[1] if best else None


# ---- choosing and reporting -------------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean(values: Iterable[float | None]) -> float | None:
    arr = finite(values)
    return float(np.mean(arr)) if arr else None


def mean_sd(values: Iterable[float | None], digits: int = 3) -> str:
    arr = finite(values)
    if not arr:
        return "n/a"
    sd = float(np.std(arr, ddof=1)) if len(arr) > 1 else 0.0
    return f"{np.mean(arr):.{digits}f} ± {sd:.{digits}f}"


def ssl_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["variant"] is not None and not r["dp"]]


def variant_order(rows: list[dict[str, Any]], names: Iterable[str] = ()) -> list[str]:
    """``names``, then the other variants of ``rows`` in the order they ran."""
    return list(dict.fromkeys([*names, *(r["variant"] for r in ssl_rows(rows))]))


def choose(rows: list[dict[str, Any]], names: Iterable[str] = ()) -> str | None:
    """The federated SSL variant with the highest mean validation AUC over seeds (rows of one data set and
    fraction); ties go to the earlier variant. None when no variant has a validation AUC."""
    best: tuple[float, str] | None = None
    for name in variant_order(rows, names):
        val = mean(r["val_auc"] for r in ssl_rows(rows) if r["variant"] == name)
        if val is not None and (best is None or val > best[0]):
            best = (val, name)
    return best[1] if best else None


def by_seed(rows: list[dict[str, Any]]) -> dict[int, float | None]:
    return {r["seed"]: r["test"].get("auc") for r in sorted(rows, key=lambda r: r["seed"])}


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def targets(stem: str, fraction: float, chosen: list[dict[str, Any]], scratch: list[dict[str, Any]],
            dp: list[dict[str, Any]], dp_epsilon: float | None) -> list[str]:
    """The issue's targets that apply to this data set and fraction, judged on test AUC (chosen on validation)."""
    fed, base = mean(r["test"].get("auc") for r in chosen), mean(r["test"].get("auc") for r in scratch)
    if fed is None or base is None:
        return ["Targets: n/a (missing AUC)."]
    seeds = by_seed(chosen)
    note = f" ({len(seeds)} seed{'s' if len(seeds) != 1 else ''}; the targets ask for 3)" if len(seeds) != 3 else ""
    gain = fed - base
    lines: list[str] = []
    if stem == "pneumoniamnist" and math.isclose(fraction, 0.1):
        lines += [f"- Federated SSL (chosen on validation) test AUC {fed:.3f}, mean of seeds{note} "
                  f"(target >= 0.95: {met(fed >= 0.95)}).",
                  f"- Federated SSL minus federated from scratch ({base:.3f}): {gain:+.3f} (target >= +0.02: "
                  f"{met(gain >= 0.02)})."]
        if dp_epsilon is not None and math.isclose(dp_epsilon, 8.0):
            dp_auc = mean(r["test"].get("auc") for r in dp)
            if not dp:
                lines.append("- DP at epsilon 8: no DP run fine-tuned the chosen variant's encoders (target >= 0.93: "
                             "not measured).")
            else:
                recipe = dp_recipe(dp[0])
                lines.append(f"- DP at epsilon 8{f' ({recipe}, chosen on validation)' if recipe else ''}: test AUC "
                             f"{fmt(dp_auc)}, mean over {len(dp)} runs (target >= 0.93: "
                             f"{met(dp_auc is not None and dp_auc >= 0.93)}).")
    elif stem == "pneumoniamnist" and math.isclose(fraction, 0.01):
        low = [v for v in seeds.values() if v is None or v < 0.90]
        lines += [f"- Federated SSL (chosen on validation) test AUC {fed:.3f} minus federated from scratch {base:.3f}: "
                  f"{gain:+.3f}{note} (target >= +0.10: {met(gain >= 0.10)}).",
                  "- Federated SSL (chosen on validation) test AUC per seed: "
                  + ", ".join(f"s{s} {fmt(v)}" for s, v in seeds.items())
                  + f" (target every seed >= 0.90: {met(not low)})."]
    elif stem in ("breastmnist", "adrenalmnist3d"):
        lines.append(f"- Federated SSL (chosen on validation) test AUC {fed:.3f} against federated from scratch "
                     f"{base:.3f}: {gain:+.3f}{note} (target above from scratch: {met(gain > 0)}).")
    else:
        lines.append(f"- No target for this data set; federated SSL minus federated from scratch {gain:+.3f}.")
    return lines


def section(stem: str, rows: list[dict[str, Any]], metas: list[dict[str, Any]], tag: str = "") -> str:
    """The docs/RESULTS.md section of one data set (``tag``: a set of runs kept apart from the others, e.g. with
    another fine-tuning selection)."""
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    order = variant_order(rows)
    dp_meta = next((m["dp"] for m in metas if m.get("dp")), None)
    best_round = any(m.get("config", {}).get("finetune-select") == "best-validation" for m in metas) or any(
        (r.get("overrides") or {}).get("finetune-select") == "best-validation" for r in rows)
    lines = [f"## Label efficiency on {stem}{f' ({tag})' if tag else ''}: federated SSL variants, chosen on "
             "validation, against centralized SSL, local-only and federated supervised training from scratch", ""]
    for m in metas:
        lines += [f"Command: `{m['command']}`",
                  f"Measured {m['date']} on {m['cores']} CPU cores ({m['cpu']}), device {m['device']}, torch "
                  f"{m['torch']}, {m['minutes']:.1f} min. Settings: {m['settings']}; seeds {m['seeds']}, labelled "
                  f"fractions {m['fractions']}; overrides: "
                  + (" ".join(f"`{k}={v}`" for k, v in m["set"].items()) or "none") + ".", ""]
    lines += [note + "\n" for note in dict.fromkeys(m["note"] for m in metas if m.get("note"))]
    lines += ["Federated SSL variants (`NAME:settings` over the run's): "
              + ", ".join(f"`{v}`" for v in dict.fromkeys(v for m in metas for v in m["variants"])) + ".",
              "Validation AUC: the global model's "
              + ("federated evaluation at the fine-tuning round each run kept (`finetune-select best-validation`: "
                 "every arm, baselines included, keeps the round whose model scored best on its validation data) "
                 if best_round else "last-round federated evaluation ")
              + "on the sites' validation shares (the "
              "official validation split, fully labelled even at 1 % labels), mean weighted by images; only federated "
              "arms have it, and the variant chosen for each fraction is the one with the highest mean validation AUC. "
              "Test AUC: the official test split, mean ± standard deviation over seeds; reported, never chosen on. "
              "Each seed pretrains once per set of pretraining settings and reuses that encoder at the other "
              "fractions and for variants that differ only in fine-tuning (checked: identical partitions); "
              "wall times marked * exclude pretraining for at least one seed. Accuracy at the 0.5 threshold."]
    if dp_meta:
        lines[-1] += (f" The DP arm fine-tunes each seed's encoder of the variant chosen on validation at "
                      f"{dp_meta['fraction']:.0%} labels with DP-SGD (dp finetune, medfed's DP recipe, epsilon "
                      f"{dp_meta['epsilon']:g}, delta {dp_meta['delta']:g}, fresh ledgers each run); a DP row's "
                      "settings in brackets after its variant (`--dp-set`) change that recipe, and where the chosen "
                      "variant has DP runs of several recipes, the DP target is judged on the one with the highest "
                      "mean validation AUC.")
    lines.append("")
    for fraction in fractions:
        here = [r for r in rows if r["fraction"] == fraction]
        chosen = choose(here, order)
        dp_by_variant: dict[str, list[dict[str, Any]]] = {}  # DP runs of several encoders/recipes (files merged)
        for r in (r for r in here if r["dp"]):
            dp_by_variant.setdefault(", ".join(filter(None, [r["variant"], dp_recipe(r)])), []).append(r)
        chosen_dp = [r for r in here if r["dp"] and r["variant"] == chosen] if chosen is not None else []
        recipe = choose_dp(chosen_dp)  # the target: the chosen variant's DP recipe best on validation
        dp = [r for r in chosen_dp if dp_recipe(r) == recipe]
        table: list[tuple[str, list[dict[str, Any]]]] = []
        if chosen is not None:
            table.append((f"**federated SSL (chosen on validation: {chosen})**",
                          [r for r in ssl_rows(here) if r["variant"] == chosen]))
        table += [(f"federated SSL: {name}", [r for r in ssl_rows(here) if r["variant"] == name]) for name in order]
        table += [(label, [r for r in here if r["arm"] == label]) for label in BASELINES]
        table += [(f"{runs[0]['arm']} ({variant})", runs) for variant, runs in dp_by_variant.items()]
        last = " test AUC of the last round |" if best_round else ""
        lines += [f"### {fraction:.0%} labels", "",
                  f"| arm | validation AUC | test AUC |{last} accuracy | wall time (s) | peak memory (MB) |",
                  "|---|---|---|---|---|---|" + ("---|" if best_round else "")]
        for label, runs in table:
            if not runs:
                continue
            star = "*" if any(r["encoder"] and not r["pretrained"] for r in runs) else ""
            lines.append(f"| {label} | {mean_sd(r['val_auc'] for r in runs)} | "
                         f"{mean_sd(r['test'].get('auc') for r in runs)} | "
                         + (f"{mean_sd(r.get('last_round_test_auc') for r in runs)} | " if best_round else "")
                         + f"{mean_sd(r['test'].get('accuracy') for r in runs)} | "
                         f"{mean_sd((r['wall'] for r in runs), 0)}{star} | {mean_sd((r['peak'] for r in runs), 0)} |")
        personal = [name for name in order if any(r["personal_test_auc"] is not None for r in ssl_rows(here)
                                                  if r["variant"] == name)]
        for name in personal:
            runs = [r for r in ssl_rows(here) if r["variant"] == name]
            lines += ["", f"Personalised models of `{name}` (each site's own personal parts; sites' shares, not the "
                      f"official split, so not comparable with the table): validation AUC "
                      f"{mean_sd(r['personal_val_auc'] for r in runs)}, test-share AUC "
                      f"{mean_sd(r['personal_test_auc'] for r in runs)} (the global model on the same shares: "
                      f"{mean_sd(r['global_site_test_auc'] for r in runs)})."]
        lines += ["", f"Per seed (validation / test AUC) at {fraction:.0%} labels:", ""]
        for label, runs in table[1:] if chosen is not None else table:
            if runs:
                lines.append(f"- {label}: " + "; ".join(
                    f"s{r['seed']} {fmt(r['val_auc'])} / {fmt(r['test'].get('auc'))}"
                    for r in sorted(runs, key=lambda r: r["seed"])))
        if chosen is not None:
            lines += ["", f"Targets at {fraction:.0%} labels (federated SSL = `{chosen}`, chosen on validation):", ""]
            lines += targets(stem, fraction, [r for r in ssl_rows(here) if r["variant"] == chosen],
                             [r for r in here if r["arm"] == SCRATCH], dp,
                             dp_meta["epsilon"] if dp_meta and dp_by_variant else None)
        lines.append("")
    return "\n".join(lines).rstrip()


# ---- input and output -------------------------------------------------------------------------------------------
def load(paths: list[str], quiet: bool = False) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Rows and per-data-set metas of several JSON files; a run (data set, fraction, seed, arm, variant, DP recipe)
    given twice keeps the later file's. Rows written before rows carried their ``pretraining_key`` get it recomputed
    from their data set's settings (the meta's ``config``) and the variant's overrides."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    metas: dict[str, list[dict[str, Any]]] = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        for r in doc["rows"]:
            key = (r["dataset"], r["fraction"], r["seed"], r["arm"], r["variant"], dp_recipe(r))
            if "pretraining_key" not in r:
                r["pretraining_key"] = recomputed_key(r, doc["datasets"].get(r["dataset"], []))
            if "last_round_test_auc" not in r:  # rows written before rows carried it: from the run's metrics
                r["last_round_test_auc"] = last_round_test_auc(Path(r.get("run_dir") or "/nonexistent"))
            if key in rows and not quiet:
                print(f"[label_efficiency] {path}: {key} given again: keeping this file's", flush=True)
            rows[key] = r
        for stem, ms in doc["datasets"].items():
            metas.setdefault(stem, []).extend(ms)
    return list(rows.values()), metas


def last_round_test_auc(run_dir: Path, arm: str = "") -> float | None:
    """The test AUC of the last fine-tuning round's model of the run in ``run_dir`` (one arm; local-only: the mean
    over sites of each site's last round), whichever round the run kept; None when its metrics.jsonl is gone. Rows of
    arm ``arm`` only (empty: every row, for rows written without it: this benchmark runs one arm a run directory).
    Beside a ``finetune-select best-validation`` run's reported AUC it shows what the choice changed."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    last: dict[Any, dict[str, Any]] = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if arm and r.get("arm") != arm:
            continue
        if r.get("phase") == "finetune" and r.get("split") == "test" and r.get("accepted", True) is not False:
            if r["site"] not in last or r["round"] >= last[r["site"]]["round"]:
                last[r["site"]] = r
    return mean(r.get("auc") for r in last.values())


def as_last_round(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as if its run had kept its last fine-tuning round (``finetune-select last``, the default): the runs
    train the same either way (the choice only keeps a copy), so the last round's validation mean (federated arms:
    the sites' shares weighted by images, as the run records it) and test AUC and accuracy (local-only: mean over
    sites of each site's last round) are read from the run's metrics.jsonl.

    Raises:
        SystemExit: the run's metrics.jsonl is gone, or has no fine-tuning test rows.
    """
    metrics = Path(row.get("run_dir") or "/nonexistent") / "metrics.jsonl"
    if not metrics.is_file():
        raise SystemExit(f"{metrics}: gone; --last-rounds reads every run's rounds from it")
    tests: dict[Any, dict[str, Any]] = {}
    vals: dict[int, list[dict[str, Any]]] = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if r.get("phase") != "finetune" or r.get("accepted", True) is False:
            continue
        if r.get("split") == "test" and (r["site"] not in tests or r["round"] >= tests[r["site"]]["round"]):
            tests[r["site"]] = r
        elif r.get("split") == "val":
            vals.setdefault(r["round"], []).append(r)
    if not tests:
        raise SystemExit(f"{metrics}: no fine-tuning test rows")
    test = {key: mean(r.get(key) for r in tests.values()) for key in ("auc", "accuracy")}
    val = weighted_means(vals[max(vals)]).get("auc") if vals else None
    return {**row, "val_auc": val, "test": test, "last_round_test_auc": None}


def recomputed_key(row: dict[str, Any], metas: list[dict[str, Any]]) -> str:
    """The pretraining key of an older row that did not store it ("" when it did not pretrain or cannot tell)."""
    if not row.get("pretrained") or not metas or row["dp"]:
        return ""
    base = RunConfig.from_flat(metas[0]["config"])
    if row["variant"] is not None:
        return pretraining_key(with_flat(base, row["overrides"], "recomputing a pretraining key"),
                               Mode.FEDERATED.value)
    return pretraining_key(base, Mode.CENTRALIZED.value) if row["arm"] == CENTRALIZED else ""


def write_all(rows: list[dict[str, Any]], metas: dict[str, list[dict[str, Any]]], results: Path,
              tag: str = "", last_rounds: bool = False) -> None:
    """One section per data set; ``last_rounds``: every run read at its last round (`as_last_round`), the
    sections saying so."""
    if last_rounds:
        rows = [as_last_round(r) for r in rows]
        metas = {stem: [{**m, "config": {**m.get("config", {}), "finetune-select": "last"},
                         "note": "Rebuilt with every run read at its last fine-tuning round (`--last-rounds`: what "
                                 "`finetune-select last`, the default, reports; the runs train the same either way), "
                                 "validation and test alike, baselines included."} for m in ms]
                 for stem, ms in metas.items()}
        for r in rows:
            r["overrides"] = {k: v for k, v in (r.get("overrides") or {}).items() if k != "finetune-select"}
    for stem, ms in metas.items():
        text = section(stem, [r for r in rows if r["dataset"] == stem], ms, tag)
        write_section(f"label_efficiency-{tag + '-' if tag else ''}{stem}", text, results)
        print(text, flush=True)


def tag_name(text: str) -> str:
    """A ``--tag``: lower-case letters, digits and dashes (it names a RESULTS.md section); empty (the default,
    which argparse passes through this too): no tag."""
    if text and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r}: use lower-case letters, digits and dashes")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS,
                        help="MedMNIST flags or files (default: the pinned copies in ../shared/data/medmnist)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ssl-variants", nargs="+", default=DEFAULT_VARIANTS, metavar="NAME[@F/F]:KEY=VALUE,...",
                        help="federated SSL arms: RunConfig flat settings over the run's, optionally only at the "
                             "labelled fractions after '@' (default: %(default)s)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="RunConfig overrides for every run, flat keys, e.g. pretrain-rounds=30")
    parser.add_argument("--set-for", nargs="+", action="append", default=[], metavar=("DATASET", "KEY=VALUE"),
                        help="overrides for one data set (its stem, e.g. adrenalmnist3d), over --set; repeatable")
    parser.add_argument("--dp-datasets", nargs="*", default=["pneumoniamnist"],
                        help="data sets (stems) that also get the DP arm (none: no DP arm)")
    parser.add_argument("--dp-fraction", type=float, default=0.1)
    parser.add_argument("--dp-epsilon", type=float, default=8.0)
    parser.add_argument("--dp-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="the DP arm's own settings over the chosen variant's and medfed's DP recipe, e.g. "
                             "finetune-mode=linear finetune-lr=0.05")
    parser.add_argument("--out-dir", default="runs/benchmarks/label_efficiency")
    parser.add_argument("--json", default="", help="write every run's numbers here (default: a new file in --out-dir)")
    parser.add_argument("--from-json", nargs="+", default=[], metavar="PATH",
                        help="rebuild the sections from these files (merged) without running anything")
    parser.add_argument("--reuse-encoders", nargs="+", default=[], metavar="PATH",
                        help="JSON files of earlier runs: fine-tune their pretrained encoders (same data set, seed "
                             "and pretraining settings) instead of pretraining again")
    parser.add_argument("--reuse-baselines", nargs="+", default=[], metavar="PATH",
                        help="JSON files of earlier runs: copy their centralized, local-only and from-scratch rows "
                             "(same data set, seed, fraction and run settings) instead of running them again")
    parser.add_argument("--last-rounds", action="store_true",
                        help="with --from-json: read every run at its last fine-tuning round (what finetune-select "
                             "last reports), also runs that kept their best validation round")
    parser.add_argument("--results", default=str(RESULTS), help="the Markdown file to write the sections into")
    parser.add_argument("--tag", default="", type=tag_name,
                        help="write the sections as label_efficiency-TAG-<data>: runs kept apart from the untagged "
                             "ones (other run settings, whose baselines must not mix with theirs; --from-json merges "
                             "rows by data set, fraction, seed, arm and variant, so give it one tag's files only)")
    args = parser.parse_args()
    results = Path(args.results)

    if args.last_rounds and not args.from_json:
        parser.error("--last-rounds reads finished runs: give it --from-json (a run's own settings decide its rounds)")
    if args.from_json:
        write_all(*load(args.from_json), results, args.tag, args.last_rounds)
    else:
        run_all(args, results)


def run_all(args: argparse.Namespace, results: Path) -> None:
    """Run every data set; after each, write its section (and, after every run, the JSON file)."""
    common = parse_pairs(args.set, "--set")
    dp_settings(args.dp_set)  # refused before any run
    per_dataset = {item[0]: parse_pairs(item[1:], f"--set-for {item[0]}") for item in args.set_for}
    stems = [RunConfig.from_flat({"data": data}).dataset.stem for data in args.datasets]
    if unknown := set(per_dataset) - set(stems):
        raise SystemExit(f"--set-for names {sorted(unknown)}, which --datasets does not run ({stems})")
    variants = [parse_variant(v, args.fractions) for v in args.ssl_variants]
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("--ssl-variants: two variants share a name")
    out = Path(args.json or Path(args.out_dir) / f"label_efficiency-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    metas: dict[str, list[dict[str, Any]]] = {}

    def save() -> None:
        out.write_text(json.dumps({"datasets": metas, "rows": rows}, indent=1))

    for data, stem in zip(args.datasets, stems, strict=True):
        run_dataset(data, stem, args, {**common, **per_dataset.get(stem, {})}, variants, rows, metas, save)
        save()
        write_all([r for r in rows if r["dataset"] == stem], {stem: metas[stem]}, results, args.tag)
    print(f"[label_efficiency] every run's numbers: {out}", flush=True)


if __name__ == "__main__":
    main()
