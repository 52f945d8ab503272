"""The round loop of one phase: Flower's ``Strategy.start`` loop, able to start at any round.

`run_rounds` drives a Flower strategy over the grid exactly as ``Strategy.start`` does (train,
aggregate, federated evaluation, server-side evaluation), with two additions a deployment
needs: it can begin at round ``first_round`` (a resumed run continues from its last completed
round, with the same round numbers, so sites recognise a round they already released), and
it calls ``after_round`` once a round is complete (the server's checkpoint), and ``on_evaluated`` with each round's
federated evaluation (``finetune-select best-validation``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from medfed.constants import DEFAULT_ROUND_TIMEOUT

TrainRound = Callable[[int, ArrayRecord, ConfigRecord], "ArrayRecord | None"]
"""One training round's exchange: (round, global arrays, train config) -> new arrays (None: keep them).
The default sends the strategy's messages and aggregates the replies; SecAgg+ replaces it
(`medfed.strategies.secagg`)."""


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    last_round: int,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    after_round: Callable[[int, ArrayRecord], None] | None = None,
    timeout: float = DEFAULT_ROUND_TIMEOUT,
    evaluate_initial: bool = True,
    on_round_timing: Callable[[int, dict[str, float]], None] | None = None,
    train_round: TrainRound | None = None,
    on_evaluated: Callable[[int, ArrayRecord, MetricRecord | None], None] | None = None,
) -> tuple[ArrayRecord, dict[int, MetricRecord]]:
    """Run rounds ``first_round..last_round``: Flower's ``Strategy.start`` loop, able to start at any round.

    Args:
        strategy: configures and aggregates each round (`medfed.strategies.shared_weights.make_strategy`).
        grid: the Flower Grid the messages go through.
        arrays: the global weights before ``first_round``.
        first_round, last_round: the rounds to run (a resumed run starts after its checkpoint's round).
        train_config, evaluate_config: the settings every train and evaluate message carries.
        evaluate_fn: the server-side evaluation of a round's global weights.
        after_round: called with each round's new weights (the deployment's checkpoint).
        timeout: seconds a round waits for the sites' replies.
        evaluate_initial: evaluate the starting weights as round 0 when starting at 1 (off for a resumed
            run, which evaluated them already).
        on_round_timing: gets each round's wall seconds, ``train-round-seconds`` (send, wait for every
            reply, aggregate) and ``evaluate-round-seconds`` (federated evaluation).
        train_round: replaces the default send-and-aggregate exchange (SecAgg+).
        on_evaluated: gets each round's global weights with their federated evaluation (the sites' validation
            metrics, aggregated; None when no site answered): the best-validation round's keeper.

    Returns:
        The final global weights and the server-side evaluation of every round.
    """
    server_metrics: dict[int, MetricRecord] = {}
    if evaluate_fn is not None and first_round == 1 and evaluate_initial:
        res = evaluate_fn(0, arrays)
        if res is not None:
            server_metrics[0] = res
    for rnd in range(first_round, last_round + 1):
        start = time.perf_counter()
        if train_round is not None:
            aggregated = train_round(rnd, arrays, train_config)
        else:
            replies = grid.send_and_receive(messages=strategy.configure_train(rnd, arrays, train_config, grid),
                                            timeout=timeout)
            aggregated, _ = strategy.aggregate_train(rnd, replies)
        if aggregated is not None:
            arrays = aggregated
        trained = time.perf_counter()
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(rnd, arrays, evaluate_config or ConfigRecord(), grid), timeout=timeout)
        validation = strategy.aggregate_evaluate(rnd, replies)
        if on_evaluated is not None:
            on_evaluated(rnd, arrays, validation)
        if on_round_timing is not None:
            on_round_timing(rnd, {"train-round-seconds": trained - start,
                                  "evaluate-round-seconds": time.perf_counter() - trained})
        if evaluate_fn is not None:
            res = evaluate_fn(rnd, arrays)
            if res is not None:
                server_metrics[rnd] = res
        if after_round is not None:
            after_round(rnd, arrays)
    return arrays, server_metrics
