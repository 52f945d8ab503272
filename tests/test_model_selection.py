"""finetune-select best-validation: which round's model a run keeps, and that the choice survives a checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medfed.constants import Phase
from medfed.exceptions import ConfigError
from medfed.experiment.model_selection import (
    STATE_PREFIX,
    BestRound,
    resumed_selection,
    selector,
    split_selection_state,
)
from medfed.experiment.resume import load_round_checkpoint, save_round_checkpoint


def weights(value: float) -> dict[str, torch.Tensor]:
    return {"head.weight": torch.full((2, 3), float(value)), "head.steps": torch.tensor(int(value), dtype=torch.int64)}


def test_the_round_with_the_highest_validation_auc_is_kept_and_ties_keep_the_earlier() -> None:
    keeper = BestRound()
    offered = [(1, 0.70), (2, 0.91), (3, 0.85), (4, 0.91), (5, 0.60)]
    kept = [keeper.offer(rnd, weights(rnd), {"auc": auc, "accuracy": 0.5}) for rnd, auc in offered]
    assert kept == [True, True, False, False, False]
    assert keeper.round == 2 and keeper.score == 0.91
    chosen, state = keeper.chosen(5, weights(5))
    assert chosen == 2 and torch.equal(state["head.weight"], torch.full((2, 3), 2.0))
    assert keeper.figures(2) == {"selected-round": 2.0, "validation-auc": 0.91}


def test_a_kept_model_is_a_copy_not_the_live_weights() -> None:
    keeper, live = BestRound(), weights(1)
    keeper.offer(1, live, {"auc": 0.8})
    live["head.weight"].add_(5.0)  # the next round trains the same tensors in place (the standalone arms do)
    assert torch.equal(keeper.chosen(2, live)[1]["head.weight"], torch.full((2, 3), 1.0))


@pytest.mark.parametrize("validation", [None, {}, {"accuracy": 0.9}, {"auc": math.nan}, {"auc": math.inf},
                                        {"auc": [1, 2]}])
def test_a_round_without_a_finite_auc_is_never_kept(validation: dict | None) -> None:
    keeper = BestRound()
    assert not keeper.offer(1, weights(1), validation)
    chosen, state = keeper.chosen(7, weights(7))
    assert chosen == 7 and torch.equal(state["head.weight"], torch.full((2, 3), 7.0))  # the last round's model
    assert keeper.figures(7) == {"selected-round": 7.0} and keeper.state() == {}


def test_the_kept_round_survives_a_checkpoint_with_its_threshold() -> None:
    keeper = BestRound()
    keeper.offer(3, weights(3), {"auc": 0.93}, {"probability": 0.4, "youden_j": 0.6, "positives": 10, "negatives": 4})
    model = weights(9)
    checkpoint = {**model, **keeper.state()}
    assert all(k.startswith(STATE_PREFIX) for k in keeper.state())
    rest, kept = split_selection_state(checkpoint)
    assert set(rest) == set(model)
    restored = BestRound.from_state(kept)
    assert (restored.round, restored.score) == (3, 0.93)
    assert restored.note == {"probability": 0.4, "youden_j": 0.6, "positives": 10.0, "negatives": 4.0}
    assert restored.weights.keys() == model.keys()
    assert torch.equal(restored.weights["head.weight"], torch.full((2, 3), 3.0))
    assert restored.weights["head.steps"].dtype == torch.int64
    assert not restored.offer(10, weights(10), {"auc": 0.92})  # later rounds compete with the restored best
    assert restored.offer(11, weights(11), {"auc": 0.95}) and restored.round == 11 and restored.note == {}


def test_an_empty_checkpoint_restores_an_empty_keeper_and_last_needs_none() -> None:
    assert BestRound.from_state({}).round is None
    assert selector("last") is None and isinstance(selector("best-validation"), BestRound)
    with pytest.raises(ValueError):
        selector("best")


def test_a_resumed_run_keeps_choosing_among_all_its_rounds_through_the_checkpoint_file(tmp_path: Path) -> None:
    """The round checkpoint on disk carries the best round (weights, score, threshold): after a resume the run
    compares its later rounds with it; a checkpoint with a best round is refused for finetune-select last."""
    keeper = BestRound()
    keeper.offer(2, weights(2), {"auc": 0.9}, {"probability": 0.3, "youden_j": 0.5, "positives": 3, "negatives": 2})
    save_round_checkpoint(tmp_path, run_id="r-1", arm="federated-none", phase=Phase.FINETUNE, completed_round=4,
                          settings={"finetune-select": "best-validation"}, weights={**weights(4), **keeper.state()})
    ckpt = load_round_checkpoint(tmp_path)
    state, restored = resumed_selection(ckpt.weights, "best-validation")
    assert set(state) == set(weights(4)) and torch.equal(state["head.weight"], torch.full((2, 3), 4.0))
    assert restored is not None and (restored.round, restored.score, restored.note["probability"]) == (2, 0.9, 0.3)
    assert restored.chosen(5, weights(5))[0] == 2
    with pytest.raises(ConfigError, match="finetune-select is last"):
        resumed_selection(ckpt.weights, "last")
    plain, none = resumed_selection(weights(4), "last")
    assert none is None and set(plain) == set(weights(4))
    fresh_state, fresh = resumed_selection(weights(4), "best-validation")  # a checkpoint before any round was kept
    assert fresh is not None and fresh.round is None and set(fresh_state) == set(weights(4))
