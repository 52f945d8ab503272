"""Which fine-tuning round's model a run keeps: the last round's, or the one with the best validation AUC.

``finetune-select best-validation`` is early stopping on held-out data (Prechelt, "Early stopping - but when?",
1998), applied to the rounds of federated fine-tuning: after every round the global model is evaluated on the
sites' validation shares (federated evaluation, the mean weighted by images, `medfed.strategies.replies`), and
the run keeps the round whose model scored the highest AUC, not the last one. With few labels under label skew
the rounds' global models swing by several points of AUC from one round to the next (docs/RESULTS.md,
label_efficiency_issue16_reading); the last round is then a draw from that swing. The standalone arms
(centralized, local-only) choose the same way on their own validation split.

The choice uses validation data only (never the test split), so the test AUC of the kept model is an honest
estimate. It adds nothing to what leaves a site: the sites' validation metrics reach the centre every round
already. Under DP-SGD the choice is post-processing of released models (the training data's guarantee holds).

`BestRound` is Flower-free: it gets each round's weights (a torch state dict) and validation metrics, keeps a
copy of the best, and travels in the server's round checkpoint (``best-validation/*``), so a resumed run keeps
choosing among all of its rounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from medfed.constants import FinetuneSelect
from medfed.exceptions import ConfigError

StateDict = dict[str, torch.Tensor]
STATE_PREFIX = "best-validation/"  # the round checkpoint's entries of the kept model
_WEIGHTS = STATE_PREFIX + "model/"
_ROUND = STATE_PREFIX + "round"
_SCORE = STATE_PREFIX + "score"
_NOTE = STATE_PREFIX + "note/"
SELECTED_SPLIT = "selected"  # metrics.jsonl split name: the round whose model the run keeps
SELECT_METRIC = "auc"


@dataclass
class BestRound:
    """The best round so far by validation ``metric`` (higher is better) and a copy of its weights.

    Ties keep the earlier round (fewer rounds of training on few labels); a round without a finite ``metric``
    (no site had both classes in its validation share) is never chosen.
    """

    metric: str = SELECT_METRIC
    round: int | None = None
    score: float = -math.inf
    weights: StateDict = field(default_factory=dict)
    note: dict[str, float] = field(default_factory=dict)  # what travels with the kept model (its threshold)

    def offer(self, server_round: int, weights: Mapping[str, torch.Tensor],
              validation: Mapping[str, object] | None, note: Mapping[str, float] | None = None) -> bool:
        """Consider round ``server_round``'s ``weights`` with its ``validation`` metrics (and a ``note`` kept with
        them: the round's decision threshold); True when kept."""
        value = (validation or {}).get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= self.score:
            return False
        self.round, self.score = server_round, float(value)
        self.weights = {k: v.detach().clone() for k, v in weights.items()}
        self.note = {k: float(v) for k, v in (note or {}).items()}
        return True

    def chosen(self, last_round: int, last_weights: StateDict) -> tuple[int, StateDict]:
        """(round, weights) to keep: the best round's, or the last round's when no round had the metric."""
        return (self.round, self.weights) if self.round is not None else (last_round, last_weights)

    def figures(self, chosen: int) -> dict[str, float]:
        """The metrics row of the choice: the round kept and its validation score (none when no round had one)."""
        return {"selected-round": float(chosen), **({f"validation-{self.metric}": self.score}
                                                    if self.round is not None else {})}

    def state(self) -> StateDict:
        """The kept round for a checkpoint (empty before any round was kept)."""
        if self.round is None:
            return {}
        return {**{_WEIGHTS + k: v for k, v in self.weights.items()},
                _ROUND: torch.tensor(self.round, dtype=torch.int64),
                _SCORE: torch.tensor(self.score, dtype=torch.float64),
                **{_NOTE + k: torch.tensor(v, dtype=torch.float64) for k, v in self.note.items()}}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], metric: str = SELECT_METRIC) -> BestRound:
        """The `BestRound` a checkpoint's `state` entries describe (an empty one when there are none)."""
        if _ROUND not in state:
            return cls(metric)
        weights = {k[len(_WEIGHTS):]: v for k, v in state.items() if k.startswith(_WEIGHTS)}
        note = {k[len(_NOTE):]: float(v) for k, v in state.items() if k.startswith(_NOTE)}
        return cls(metric, int(state[_ROUND]), float(state[_SCORE]), weights, note)


def selector(select: FinetuneSelect | str) -> BestRound | None:
    """A `BestRound` for ``finetune-select best-validation``, None for ``last``."""
    return BestRound() if FinetuneSelect(select) == FinetuneSelect.BEST_VALIDATION else None


def split_selection_state(weights: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
    """A checkpoint's arrays split into (the rest, the kept round's entries)."""
    return ({k: v for k, v in weights.items() if not k.startswith(STATE_PREFIX)},
            {k: v for k, v in weights.items() if k.startswith(STATE_PREFIX)})


def resumed_selection(weights: Mapping[str, torch.Tensor], select: FinetuneSelect | str
                      ) -> tuple[StateDict, BestRound | None]:
    """A fine-tuning checkpoint's (global weights, the keeper with the best round so far) for ``select``.

    Raises:
        ConfigError: the checkpoint keeps a best round but the run's ``finetune-select`` is last (the resume
            check refuses a changed setting first; this guards a checkpoint written otherwise).
    """
    state, kept = split_selection_state(weights)
    keeper = selector(select)
    if kept and keeper is None:
        raise ConfigError("the checkpoint keeps a best-validation round, but the run's finetune-select is last")
    return state, BestRound.from_state(kept) if keeper is not None else None


__all__ = ["SELECTED_SPLIT", "STATE_PREFIX", "BestRound", "resumed_selection", "selector", "split_selection_state"]
