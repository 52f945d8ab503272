"""The peer baseline of `site_scaling.py`: a plain Flower app, written as a researcher would with Flower alone.

It follows Flower's quickstart-pytorch example (Message API): a `ClientApp` whose ``@app.train`` and
``@app.evaluate`` load the site's share of the data by ``context.node_config["partition-id"]`` (cached per worker,
as the example caches its dataset), a `ServerApp` whose main builds the model and calls ``FedAvg(...).start``, and
``run_simulation`` in this process with the backend config medfed's launcher uses (Ray, ``client-cpus`` CPUs per
site). What it shares with medfed is only what a comparison needs to be of the same work:

* the model: medfed's classifier (`medfed.task.model_setup.new_classifier`, CNN of the given width), starting from
  the weights medfed's fine-tuning starts from (same seed, same builder);
* the data: PneumoniaMNIST's official train and val splits, each cut IID into ``num-sites`` shares by one seeded
  permutation; a site trains on its whole train share and evaluates on its val share (possibly empty at many sites);
* the training: one local epoch of full supervised fine-tuning per round with AdamW at medfed's fine-tuning
  recipe (learning rate, batch size, weight decay), cross-entropy, no augmentation.

Each round's wall time is taken where medfed takes its own (`medfed.server.rounds.run_rounds`): from the start of
``configure_train`` to the end of ``aggregate_train`` (train), then to the end of ``aggregate_evaluate`` (evaluate).
The last line printed is a JSON object with those timings and the aggregated metrics of every round.

    python benchmarks/plain_flower_app.py --num-sites 10 --rounds 3
    python benchmarks/plain_flower_app.py --num-sites 1000 --rounds 3 --fraction-train 0.01
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before Flower is imported

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.simulation import run_simulation
from torch.utils.data import DataLoader, TensorDataset

from medfed.config import RunConfig, run_config
from medfed.constants import TaskType
from medfed.models.encoders import InputSpec
from medfed.models.heads import Classifier
from medfed.task.model_setup import initial_encoder_state, new_classifier

ROOT = Path(__file__).resolve().parents[1]
NPZ = Path(os.environ.get("MEDFED_SHARED_DATA", ROOT.parent / "shared" / "data" / "medmnist")) / "pneumoniamnist.npz"
SPEC = InputSpec(channels=1, spatial_shape=(28, 28))
NUM_CLASSES = 2
WEIGHT_DECAY = 1e-4  # medfed's TrainSettings default, so the optimiser is the same
EVAL_BATCH = 512


# ---- task: model, data, train and test (quickstart's task.py) ----------------------------------------------------


@functools.lru_cache(maxsize=4)
def model_config(width: int, seed: int) -> RunConfig:
    return run_config(width=width, seed=seed)


def new_model(width: int, seed: int) -> Classifier:
    """medfed's classifier for PneumoniaMNIST at this width (the architecture; weights are loaded after)."""
    return new_classifier(model_config(width, seed), SPEC, TaskType.BINARY, NUM_CLASSES, None)


def initial_model(width: int, seed: int) -> Classifier:
    """The weights medfed's fine-tuning starts from without pretraining: its seeded encoder in the classifier."""
    cfg = model_config(width, seed)
    return new_classifier(cfg, SPEC, TaskType.BINARY, NUM_CLASSES, initial_encoder_state(cfg, SPEC))


_DATA: dict[str, np.ndarray] = {}  # the npz's arrays, read once per worker process (quickstart caches its `fds`)


def load_data(partition_id: int, num_partitions: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """This site's IID shares of the official train and val splits (images scaled to [0, 1])."""
    if not _DATA:
        with np.load(NPZ) as data:
            _DATA.update({key: data[key] for key in data.files})
    shares = []
    for split in ("train", "val"):
        images, labels = _DATA[f"{split}_images"], _DATA[f"{split}_labels"]
        order = np.random.default_rng(seed).permutation(len(images))
        idx = np.array_split(order, num_partitions)[partition_id]
        x = torch.from_numpy(images[idx]).float().div_(255.0).unsqueeze(1)
        y = torch.from_numpy(labels[idx, 0].astype(np.int64))
        shares.append(TensorDataset(x, y))
    return shares[0], shares[1]


def train_fn(model: Classifier, loader: DataLoader, epochs: int, lr: float) -> float:
    """AdamW on cross-entropy; the mean training loss of the last epoch."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        losses = []
        for images, labels in loader:
            optimiser.zero_grad()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    return float(np.mean(losses)) if losses else 0.0


@torch.no_grad()
def test_fn(model: Classifier, loader: DataLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``loader``'s examples."""
    model.eval()
    loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        logits = model(images)
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
    return (loss / seen, correct / seen) if seen else (0.0, 0.0)


# ---- ClientApp ---------------------------------------------------------------------------------------------------

client_app = ClientApp()


def number(record: ConfigRecord | MetricRecord, key: str) -> float:
    """A scalar setting or metric of a record."""
    value = record[key]
    if not isinstance(value, int | float):
        raise TypeError(f"{key!r} is {value!r}, not a number")
    return float(value)


def _site_data(context: Context, config: ConfigRecord) -> tuple[TensorDataset, TensorDataset]:
    node = context.node_config
    return load_data(int(node["partition-id"]), int(node["num-partitions"]), int(number(config, "seed")))


def _received_model(msg: Message, config: ConfigRecord) -> Classifier:
    model = new_model(int(number(config, "width")), int(number(config, "seed")))
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return model


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this site's train share; reply with the weights and the training loss."""
    config = msg.content.config_records["config"]
    model = _received_model(msg, config)
    trainset, _ = _site_data(context, config)
    gen = torch.Generator().manual_seed(int(number(config, "seed")) * 1_000_003 + int(number(config, "server-round")))
    loader = DataLoader(trainset, batch_size=int(number(config, "batch-size")), shuffle=True, generator=gen)
    train_loss = train_fn(model, loader, int(number(config, "local-epochs")), number(config, "lr"))
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(trainset)})
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}),
                   reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The received model on this site's val share: loss and accuracy."""
    config = msg.content.config_records["config"]
    model = _received_model(msg, config)
    _, valset = _site_data(context, config)
    eval_loss, eval_acc = test_fn(model, DataLoader(valset, batch_size=EVAL_BATCH))
    metrics = MetricRecord({"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(valset)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


# ---- ServerApp ---------------------------------------------------------------------------------------------------


def weighted_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Flower's weighted average, empty when every sampled site had no example (1000 sites share 524 val images)."""
    total = sum(number(next(iter(r.metric_records.values())), weight_key) for r in records)
    return aggregate_metricrecords(records, weight_key) if total > 0 else MetricRecord()


class TimedFedAvg(FedAvg):
    """FedAvg that records each round's wall time as medfed does: configure_train to aggregate_train (train), then
    to aggregate_evaluate (evaluate)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timings: dict[int, dict[str, float]] = {}
        self._start = self._trained = 0.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._start = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        result = super().aggregate_train(server_round, replies)
        self._trained = time.perf_counter()
        return result

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        result = super().aggregate_evaluate(server_round, replies)
        self.timings[server_round] = {"train-round-seconds": self._trained - self._start,
                                      "evaluate-round-seconds": time.perf_counter() - self._trained}
        return result


def make_server_app(args: argparse.Namespace, out: dict[str, Any]) -> ServerApp:
    """The ServerApp; what its run produced (timings, metrics) is put in ``out``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        recipe = model_config(args.width, args.seed).finetune_recipe
        shared: dict[str, ConfigRecordValues] = {"width": args.width, "seed": args.seed}
        train_config = ConfigRecord({**shared, "lr": recipe.lr, "batch-size": recipe.batch_size,
                                     "local-epochs": args.local_epochs})
        strategy = TimedFedAvg(fraction_train=args.fraction_train, fraction_evaluate=args.fraction_evaluate,
                               evaluate_metrics_aggr_fn=weighted_metrics)
        started = time.perf_counter()
        initial = ArrayRecord(initial_model(args.width, args.seed).state_dict())
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=args.rounds, train_config=train_config,
                                evaluate_config=ConfigRecord(shared))
        out["start-seconds"] = time.perf_counter() - started
        out["rounds"] = {
            rnd: {**strategy.timings.get(rnd, {}),
                  **dict(result.train_metrics_clientapp.get(rnd, {})),
                  **dict(result.evaluate_metrics_clientapp.get(rnd, {}))}
            for rnd in range(1, args.rounds + 1)
        }

    return server_app


def backend_config(client_cpus: int, verbose: bool) -> dict[str, dict[str, ConfigRecordValues]]:
    """The backend medfed simulates on without a ray-address (`medfed.simulations.launcher.backend_config`): a Ray
    instance of this machine, ``client_cpus`` CPUs and no GPU per site, Ray's logs at ERROR."""
    cpus = client_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {"logging_level": "WARNING" if verbose else "ERROR", "log_to_driver": verbose,
                      "address": "local", "num_cpus": max(cpus, os.cpu_count() or 1)},
    }


def same_ray_environment() -> None:
    """The environment medfed's launcher gives Ray, so both sides run on the same Ray: CUDA_VISIBLE_DEVICES left
    alone at zero GPUs, and token authentication for the local instance (`medfed.simulations.launcher`,
    ``local_ray_auth``; set before Ray is imported, which Flower does lazily in run_simulation)."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-sites", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction-train", type=float, default=1.0)
    parser.add_argument("--fraction-evaluate", type=float, default=0.0, help="0: the same as --fraction-train")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--width", type=int, default=16, help="the CNN's first-stage channels (medfed's --width)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client-cpus", type=int, default=1, help="CPUs per simulated site (0: all)")
    parser.add_argument("--verbose", action="store_true", help="Flower's and Ray's logs")
    args = parser.parse_args(argv)
    if args.num_sites < 2:
        parser.error("--num-sites must be at least 2 (FedAvg samples at least two nodes)")
    args.fraction_evaluate = args.fraction_evaluate or args.fraction_train
    if not NPZ.is_file():
        parser.error(f"{NPZ} not found (set MEDFED_SHARED_DATA to the folder holding pneumoniamnist.npz)")
    same_ray_environment()
    if not args.verbose:  # as medfed's launcher: Flower logs every round at INFO
        logging.getLogger("flwr").setLevel(logging.ERROR)
    out: dict[str, Any] = {"num-sites": args.num_sites, "fraction-train": args.fraction_train,
                           "fraction-evaluate": args.fraction_evaluate, "width": args.width}
    started = time.perf_counter()
    run_simulation(server_app=make_server_app(args, out), client_app=client_app, num_supernodes=args.num_sites,
                   backend_config=backend_config(args.client_cpus, args.verbose), verbose_logging=False)
    out["run-simulation-seconds"] = time.perf_counter() - started
    if "rounds" not in out:
        raise SystemExit("the ServerApp ended without a result (see the log above)")
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    # Run the importable module, not __main__: Ray then pickles the ClientApp by reference and each worker imports
    # this file once (Ray puts the script's folder on the workers' path), so `_DATA` lasts across rounds as the
    # quickstart's dataset cache does, instead of being rebuilt with every message.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import plain_flower_app

    plain_flower_app.main()
