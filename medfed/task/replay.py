"""A site's last release per run and phase, kept on its own disk, so a repeated round costs nothing.

When the server dies after sending round k and is resumed from its checkpoint of round k-1, it
asks every site for round k again, with the same global weights. A site that already trained
round k has already released its update and written the round's ledger row; training again
would be a second release (fresh noise, a second row): privacy spent twice for one round.
Instead the site answers with the very update it released before. Re-sending a release is
post-processing of it and costs no privacy, so the ledger totals of a resumed run equal those
of an uninterrupted one.

A release is matched by a SHA-256 over the run id, phase, round, the run settings and every
incoming array (name, dtype, shape, bytes); anything different is a new round and trains as
usual. One file per (run, phase) holds the latest release, written atomically (temporary file,
fsync, rename), so a crash leaves the previous release or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from medfed.files import save_safetensors_durably

RELEASES_DIR = "releases"
_KEY_META, _METRICS_META = "release-key", "metrics"


def release_key(run_id: str, phase: str, server_round: int, settings: Mapping[str, object],
                incoming: Mapping[str, torch.Tensor]) -> str:
    """The identity of a round's request: what the site was asked to train, exactly."""
    h = hashlib.sha256()
    h.update(json.dumps({"run": run_id, "phase": phase, "round": server_round,
                         "settings": {k: settings[k] for k in sorted(settings)}}, sort_keys=True, default=str).encode())
    for name in sorted(incoming):
        t = incoming[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


KEPT = "kept-state/"
"""Prefix, in a release file, of the state the site kept after that round (its SSL heads and kept encoder, or its
personal parts): restored with the release, so a resumed run (a new Flower run, whose node state starts empty) or a
restarted SuperNode goes on from where the site was."""


@dataclass(frozen=True)
class Release:
    """An update a site sent, the metrics that went with it, and the state the site kept after that round."""

    arrays: dict[str, torch.Tensor]
    metrics: dict[str, float]
    kept: dict[str, torch.Tensor] = field(default_factory=dict)


class ReleaseCache:
    """The latest release of each (run, phase) under ``folder`` (on the site's own disk)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, run_id: str, phase: str) -> Path:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:16]
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:48]
        return self.folder / f"{slug}-{digest}-{phase}.safetensors"

    def get(self, run_id: str, phase: str, key: str) -> Release | None:
        """The release made for exactly this request, or None (a new round, or nothing kept)."""
        path = self._path(run_id, phase)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get(_KEY_META) != key:
                return None
            arrays = load_file(str(path))
            metrics = {k: float(v) for k, v in json.loads(meta[_METRICS_META]).items()}
        except (OSError, SafetensorError, KeyError, ValueError):
            return None  # unreadable: train again (conservative: a new release is recorded as one)
        return Release({k: v for k, v in arrays.items() if not k.startswith(KEPT)}, metrics,
                       {k[len(KEPT):]: v for k, v in arrays.items() if k.startswith(KEPT)})

    def latest_kept(self, run_id: str, phase: str) -> dict[str, torch.Tensor] | None:
        """The state the site kept after its latest round of (run, phase), whatever the round; None without one."""
        path = self._path(run_id, phase)
        try:
            with safe_open(str(path), framework="pt") as f:
                kept = {k[len(KEPT):]: f.get_tensor(k) for k in f.keys() if k.startswith(KEPT)}
        except (OSError, SafetensorError):
            return None
        return kept or None

    def put(self, run_id: str, phase: str, key: str, release: Release) -> None:
        """Keep ``release`` as the latest of (run, phase), replacing the previous one atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(run_id, phase)
        arrays = {**release.arrays, **{KEPT + k: v.detach().cpu().clone() for k, v in release.kept.items()}}
        save_safetensors_durably(path, arrays, {_KEY_META: key, _METRICS_META: json.dumps(release.metrics)})
