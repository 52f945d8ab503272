"""Latency settings of Flower's deployment runtime that it does not expose as options.

Measured with cProfile in forked ClientApp processes during `benchmarks/deployment_overhead.py`
(3 sites, 2 cores): 16-17 s of a 24 s ClientApp run went to *pulling the round's message* from
the SuperNode, not to training. A message is about 150 objects (every tensor is an object, and so
is each of its chunks). The SuperNode hands the task to a ClientApp as soon as the message's
head arrives, while it is still fetching the objects from the SuperLink; every object the
ClientApp asks for too early waits in Flower's exponential backoff, which starts at 1 s and is
capped at 10 s (``flwr.supercore.constant.PULL_INITIAL_BACKOFF`` / ``PULL_BACKOFF_CAP``), with
two pulling threads on a 2-core machine. The same wait exists wherever Flower pulls objects (the
SuperNode from the SuperLink, the ServerApp pulling replies). And an idle SuperNode asks the
SuperLink for new messages every 3 s (a plain ``time.sleep(3)`` in
``flwr.supernode.start_client_internal``), so each message waits 1.5 s on average before a site
even sees it.

`tune_object_pulls` shortens that backoff (first retry after 50 ms, at most 0.5 s apart) and
`tune_supernode_polling` caps the SuperNode's sleeps at 0.5 s. Neither changes what is sent or
checked: only how soon a waiting process asks again (a small local request each time). They are
applied in medfed's own processes: the warm SuperExec's ClientApps (`medfed.deploy.warm_exec`),
the SuperNode that ``medfed site`` starts (``python -m medfed.flower_patches.flower_tuning supernode``,
which then runs ``flower-supernode`` unchanged), and the ServerApp. flwr is pinned
(`medfed.flower_patches.FLOWER_VERSION`); each function refuses to run if the attribute it tunes is not there.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence

PULL_INITIAL_BACKOFF = 0.05  # s; Flower 1.41-1.42: 1 s
PULL_BACKOFF_CAP = 0.5  # s; Flower 1.41-1.42: 10 s
SUPERNODE_SLEEP_CAP = 0.5  # s; Flower 1.41-1.42 idles 3 s between asking the SuperLink for messages


def tune_object_pulls(initial_backoff: float = PULL_INITIAL_BACKOFF,
                      backoff_cap: float = PULL_BACKOFF_CAP) -> dict[Callable[..., object], tuple[float, float]]:
    """Retry an object that is not available yet after ``initial_backoff`` seconds, doubling up
    to ``backoff_cap``, in every Flower pull of this process (the defaults of the two pull
    functions every caller in flwr 1.41-1.42 goes through). Returns the previous values, for
    `object_pulls_tuned` to put back."""
    if not 0 < initial_backoff <= backoff_cap:
        raise ValueError(f"need 0 < initial_backoff <= backoff_cap, got {initial_backoff}, {backoff_cap}")
    from flwr.supercore.inflatable import inflatable_utils

    previous: dict[Callable[..., object], tuple[float, float]] = {}
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__ or {}
        if "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(f"flwr's {fn.__qualname__} has no initial_backoff/backoff_cap: not the flwr medfed pins")
        previous[fn] = (defaults["initial_backoff"], defaults["backoff_cap"])
        defaults["initial_backoff"], defaults["backoff_cap"] = initial_backoff, backoff_cap
    return previous


@contextlib.contextmanager
def object_pulls_tuned() -> Iterator[None]:
    """`tune_object_pulls` for the duration of a ``with`` block, then Flower's values as they were: for a
    ServerApp, which may run inside a process that outlives it (a test, an in-process runtime)."""
    previous = tune_object_pulls()
    try:
        yield
    finally:
        for fn, (initial_backoff, backoff_cap) in previous.items():
            defaults = fn.__kwdefaults__
            assert defaults is not None  # tune_object_pulls found both keys there
            defaults["initial_backoff"], defaults["backoff_cap"] = initial_backoff, backoff_cap


class CappedSleep:
    """The ``time`` module, except that ``sleep`` never waits longer than ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def tune_supernode_polling(cap: float = SUPERNODE_SLEEP_CAP) -> None:
    """Cap the SuperNode main loop's sleeps (3 s when idle, 0.5 s while waiting for a reply)."""
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    from flwr.supernode import start_client_internal

    current = getattr(start_client_internal, "time", None)
    if not (current is time or isinstance(current, CappedSleep)):
        raise RuntimeError("flwr.supernode.start_client_internal does not use the time module: "
                           "not the flwr medfed pins")
    start_client_internal.time = CappedSleep(cap)  # type: ignore[assignment]  # a stand-in for the time module


def run_supernode(argv: Sequence[str]) -> None:
    """``flower-supernode ARGV`` with the tuning above (what ``medfed site`` starts), presenting the
    site's client certificate when the environment names one (`medfed.flower_patches.client_tls`)."""
    from medfed.flower_patches.client_tls import present_from_environment

    present_from_environment()
    tune_object_pulls()
    tune_supernode_polling()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]  # argv[0] names the process in Flower's exit handling
    flower_supernode()


if __name__ == "__main__":
    if sys.argv[1:2] != ["supernode"]:
        raise SystemExit("usage: python -m medfed.flower_patches.flower_tuning supernode [flower-supernode options]")
    run_supernode(sys.argv[2:])
