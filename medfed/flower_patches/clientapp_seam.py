"""Patch: hooks in Flower's ClientApp runtime between pulling a task and installing its app bundle.

``flwr.supernode.runtime.run_clientapp.run_clientapp`` pulls the task (message, context, run, FAB)
with ``pull_task_input`` and installs the FAB with ``install_from_fab``, looking both names up in
its module at call time. `install_hooks` wraps both: ``on_task`` sees the pulled task, and
``before_install`` gets the FAB's bytes and may refuse (raise) before anything is installed or
loaded; Flower then installs exactly those bytes, not a path read again. The policy (which apps a
site approved) is `medfed.deploy.clientapp_gate`'s; this module is only the seam.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.exceptions import FederationError

TARGET_MODULE = "flwr.supernode.runtime.run_clientapp"
PATCHED = ("pull_task_input", "install_from_fab")
CLIENTAPP_ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"
_MARK = "__medfed_app_gate__"

OnTask = Callable[[Any, Any, Any, Any], None]  # (message, context, run, fab)
BeforeInstall = Callable[[bytes], None]


def target_module() -> Any:
    """Flower's ClientApp runtime module, checked to still have the seam: both names exist, and
    ``run_clientapp`` looks them up in the module at call time.

    Raises:
        FederationError: this Flower is not the one the seam was written for (ClientApps must not run ungated).
    """
    module = importlib.import_module(TARGET_MODULE)
    runner = getattr(module, "run_clientapp", None)
    names = getattr(getattr(runner, "__code__", None), "co_names", ())
    for name in PATCHED:
        if not callable(getattr(module, name, None)) or name not in names:
            raise FederationError(f"{TARGET_MODULE}.run_clientapp no longer calls {name}: this flwr is not the "
                                  "one medfed's app gate was written for; refusing to run ClientApps ungated")
    return module


def is_installed(module: Any | None = None) -> bool:
    """Whether this process's ClientApp runtime already runs through the hooks."""
    module = module or target_module()
    return all(getattr(getattr(module, name), _MARK, False) for name in PATCHED)


def install_hooks(on_task: OnTask, before_install: BeforeInstall) -> None:
    """Route every ClientApp task of this process (and its forks) through the hooks (idempotent)."""
    module = target_module()
    if is_installed(module):
        return
    original_pull: Callable[..., Any] = module.pull_task_input
    original_install: Callable[..., Any] = module.install_from_fab

    @functools.wraps(original_pull)
    def pull_task_input(*args: Any, **kwargs: Any) -> Any:
        message, context, run, fab = original_pull(*args, **kwargs)
        on_task(message, context, run, fab)
        return message, context, run, fab

    @functools.wraps(original_install)
    def install_from_fab(fab_file: Path | bytes, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        before_install(content)
        return original_install(content, *args, **kwargs)  # the bytes that were checked, not a path re-read

    setattr(pull_task_input, _MARK, True)
    setattr(install_from_fab, _MARK, True)
    module.pull_task_input = pull_task_input
    module.install_from_fab = install_from_fab


def installed_app_folder(fab_id: str, fab_version: str, app_hash: str) -> Path:
    """Where Flower installs (and, when present, loads without reinstalling) an app:
    ``FLWR_HOME/apps/<publisher>.<name>.<version>.<first 8 hex of its hash>``."""
    from flwr.common.config import get_project_dir

    return Path(get_project_dir(fab_id, fab_version, app_hash))
