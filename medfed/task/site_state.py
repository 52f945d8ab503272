"""What a site keeps between rounds (its SSL heads and kept encoder, its personal parts) belongs to one run and
one set of settings.

A site's kept state is stamped with the run's id and a digest of its settings. Kept state of another run (another
arm, a new `flwr run`) is dropped: each run starts its sites afresh. A message of the same run whose settings
differ is refused: otherwise a server could switch, say, ``ssl-aggregation`` to fedu for one round and receive the
site's own predictor, which it never sent (the attack review of issue 16).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from medfed.exceptions import ConfigError

StateDict = dict[str, torch.Tensor]
RUN_STAMP = "stamp/run"
SETTINGS_STAMP = "stamp/settings"


def _digest(value: Any) -> torch.Tensor:
    raw = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).digest()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


@dataclass(frozen=True)
class StateStamp:
    """The run id and settings a site's kept state belongs to."""

    run: torch.Tensor
    settings: torch.Tensor

    @classmethod
    def of(cls, run_id: str, settings: dict[str, Any]) -> StateStamp:
        return cls(_digest(run_id), _digest(settings))

    def seal(self, state: StateDict | None) -> StateDict | None:
        """``state`` with the stamp added (None stays None)."""
        return None if state is None else {**state, RUN_STAMP: self.run, SETTINGS_STAMP: self.settings}

    def open(self, state: StateDict | None) -> StateDict | None:
        """The kept state without its stamp when it belongs to this run; None when it belongs to another run (or
        carries no stamp).

        Raises:
            ConfigError: the state belongs to this run but was kept under other settings: the server changed the
                run's settings between rounds.
        """
        if not state:
            return None
        run, settings = state.get(RUN_STAMP), state.get(SETTINGS_STAMP)
        if run is None or settings is None or not torch.equal(run, self.run):
            return None
        if not torch.equal(settings, self.settings):
            raise ConfigError("this run's settings differ from those of its earlier rounds at this site; a run's "
                              "settings cannot change between rounds (the site keeps state for them)")
        return {k: v for k, v in state.items() if k not in (RUN_STAMP, SETTINGS_STAMP)}
