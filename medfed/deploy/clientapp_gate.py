"""The site's gate: a ClientApp process refuses an app the site has not approved, before the app is
installed or loaded.

Where. Flower's ClientApp process (``flwr.supernode.runtime.run_clientapp.run_clientapp``)
pulls the task (message, context, run, FAB) from its SuperNode, then calls ``install_from_fab``
with the FAB's bytes, then imports the app and runs it. `install` replaces two names in that
module's namespace (a patch of Flower internals, checked against the pinned flwr and refused otherwise):

* ``pull_task_input``: unchanged, but remembers what the task declared (run id, app id and version,
  FAB hash, run config);
* ``install_from_fab``: hashes the *actual FAB bytes* and looks them up in the site's allow-list,
  read afresh from the kit for every task (`medfed.deploy.approval`). An approved app whose run
  names it (Flower loads the ClientApp from the folder named by the run's app id, version and
  hash, so they must be this FAB's) is recorded in the site's run log and installed by Flower's own
  function; any other app is refused: a line on
  stderr, a "refused" entry in the run log, and `AppNotApproved` raised. ``run_clientapp`` turns
  that exception into an Error reply to the server (its reason carries the message, which names the
  site and the app's sha256) and exits; nothing of the app was unpacked or imported, and the process
  never opened the site's data, keys or ledger.

Every ClientApp launch of a site goes through here (`medfed.deploy.warm_exec`): the warm zygote
installs the gate before it forks ClientApps; a fresh process is started as
``python -m medfed.deploy.clientapp_gate ARGS`` (`main`): it installs the gate, reads its task token
from standard input (never from its command line: ``/proc/PID/cmdline`` is world-readable), and runs
``flwr-clientapp``'s entry with the token put into its own ``sys.argv``.

The gate's settings reach it from the SuperExec's command line through the environment
(`GateSettings`, never through the node config, which the app may read and the SuperNode holds);
without them the gate refuses to start. Everything the gate runs is imported when it is installed:
the ClientApp later imports the *submitted* app's medfed, after medfed's own modules are dropped.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.deploy import approval, run_log
from medfed.exceptions import AppNotApproved, ConfigError, MedfedError
from medfed.flower_patches import clientapp_seam

CLIENTAPP_ENTRY = clientapp_seam.CLIENTAPP_ENTRY
APPROVALS_ENV, RUN_LOG_ENV, SITE_ENV = "MEDFED_GATE_APPROVED_APPS", "MEDFED_GATE_RUN_LOG", "MEDFED_GATE_SITE"
OWN_PACKAGE = "medfed"
TOKEN_LIMIT = 4096  # bytes read from stdin for the token (Flower's are 64 hex digits)


def _log(text: str) -> None:
    print(f"[medfed app gate pid {os.getpid()}] {text}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GateSettings:
    """Where the gate finds the site's allow-list and run log, and the site's name (for messages)."""

    approved_apps: Path
    run_log: Path
    site: str

    @classmethod
    def for_kit(cls, kit_dir: Path, site: str) -> GateSettings:
        kit = Path(kit_dir).resolve()
        return cls(approval.approvals_file(kit), run_log.run_log_file(kit), site)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GateSettings:
        """The settings the SuperExec put in the environment; ConfigError if any is missing."""
        env = os.environ if env is None else env
        missing = [k for k in (APPROVALS_ENV, RUN_LOG_ENV, SITE_ENV) if not env.get(k)]
        if missing:
            raise ConfigError(f"the ClientApp gate has no settings ({', '.join(missing)} not set): a site's "
                              "ClientApps must be started by medfed's SuperExec (`medfed site`)")
        return cls(Path(env[APPROVALS_ENV]), Path(env[RUN_LOG_ENV]), env[SITE_ENV])

    def to_env(self) -> dict[str, str]:
        return {APPROVALS_ENV: str(self.approved_apps), RUN_LOG_ENV: str(self.run_log), SITE_ENV: self.site}


@dataclass
class _Task:
    """What the task pulled by this process declared (one task per ClientApp process)."""

    run_id: int | None = None
    declared_hash: str | None = None
    run_config_sha256: str | None = None
    fab_id: str | None = None
    fab_version: str | None = None


_current = _Task()


def _record(settings: GateSettings, task: _Task, app_hash: str, outcome: str, reason: str = "") -> None:
    run_log.append_run(settings.run_log, run_id=task.run_id, app_sha256=app_hash,
                        run_config_sha256=task.run_config_sha256, outcome=outcome, reason=reason)


def check_app(settings: GateSettings, fab: bytes, task: _Task | None = None) -> str:
    """Approve ``fab`` for this site or refuse it; returns its sha256. Refusal: a stderr line, a
    "refused" run-log entry (once per run) and `AppNotApproved`, whose message names the site and the
    app's sha256. A FAB whose bytes differ from the hash its task declared, an approved FAB whose run
    names another app id or version (Flower would load another installed folder), an unreadable
    allow-list and an approved run that cannot be logged are refused too."""
    task = task or _Task()
    app_hash = hashlib.sha256(fab).hexdigest()
    reason = ""
    if task.declared_hash is not None and task.declared_hash != app_hash:
        reason = f"its bytes do not match the hash its task declared (sha256:{task.declared_hash})"
    else:
        try:
            if app_hash not in approval.approved_hashes(settings.approved_apps):
                reason = "not in its approved apps (medfed site approve)"
        except MedfedError as exc:
            _log(f"site {settings.site}: {exc}")
            reason = "its approved-apps file cannot be read (see the site's SuperExec log)"
    if not reason and task.fab_id is not None:  # only an approved FAB's zip is opened
        try:
            named = approval.fab_app_id(fab)
        except MedfedError:
            named = None
        if named != (task.fab_id, task.fab_version):
            reason = (f"its run names app {task.fab_id} {task.fab_version}, not the one in its bundle "
                      f"({'unreadable' if named is None else ' '.join(named)})")
    if not reason:
        try:
            _record(settings, task, app_hash, approval.APPROVED)
        except (MedfedError, OSError) as exc:
            _log(f"site {settings.site}: {exc}")
            reason = "the run cannot be recorded in its run log (see the site's SuperExec log)"
        else:
            _log(f"site {settings.site} runs approved app sha256:{app_hash} (run {task.run_id})")
            return app_hash
    message = f"site {settings.site} refused app sha256:{app_hash}: {reason}"
    _log(f"{message} (run {task.run_id})")
    try:
        _record(settings, task, app_hash, approval.REFUSED, reason)
    except (MedfedError, OSError) as exc:
        _log(f"site {settings.site}: the refusal could not be recorded in the run log: {exc}")
    raise AppNotApproved(message)


# ------------------------------------------------------------------------------------ the patch

def _on_task(message: Any, context: Any, run: Any, fab: Any) -> None:
    """Remember the pulled task's run, app and settings for the check of its app bundle."""
    config = getattr(context, "run_config", None)
    if config is None:
        config = getattr(run, "override_config", None)
    _current.run_id = getattr(run, "run_id", None)
    _current.fab_id = getattr(run, "fab_id", None)
    _current.fab_version = getattr(run, "fab_version", None)
    _current.declared_hash = getattr(fab, "hash_str", None) or None
    _current.run_config_sha256 = run_log.run_config_digest(config)


def install(settings: GateSettings) -> None:
    """Gate every ClientApp this process (and its forks) will run (idempotent)."""

    def before_install(content: bytes) -> None:
        app_hash = check_app(settings, content, _current)
        if _current.fab_id is not None:  # a real task: Flower loads the folder named by id, version, hash prefix
            if not _current.declared_hash:
                raise AppNotApproved(f"site {settings.site} refused app sha256:{app_hash}: its task declared no hash")
            clear_stale_install(content, _current.fab_id, _current.fab_version or "", app_hash)

    clientapp_seam.install_hooks(_on_task, before_install)


def installed_app_matches(folder: Path, fab: bytes) -> bool:
    """Whether ``folder`` holds exactly the files of ``fab`` (by sha256; bytecode caches aside)."""
    expected = {f.path: f.sha256 for f in approval.describe_fab(fab).files}
    present = {}
    for path in folder.rglob("*"):
        if path.is_dir() or "__pycache__" in path.parts:
            continue
        present[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return present == expected


def clear_stale_install(fab: bytes, fab_id: str, fab_version: str, app_hash: str) -> None:
    """Flower installs an app into ``FLWR_HOME/apps/<publisher>.<name>.<version>.<first 8 hex of its
    hash>`` and keeps a folder already there untouched, then loads whatever that folder holds. A folder
    that is not exactly the approved FAB's files (planted, left by an ungated install, or another app
    whose hash shares the 8-hex prefix) is removed, so the approved bytes are what gets installed."""
    folder = clientapp_seam.installed_app_folder(fab_id, fab_version, app_hash)
    if folder.exists() and not installed_app_matches(folder, fab):
        _log(f"removing {folder}: it does not hold exactly the approved app sha256:{app_hash}")
        shutil.rmtree(folder)


def forget_own_modules() -> None:
    """Drop medfed's modules, so that the ClientApp imports the submitted app's medfed."""
    for name in [m for m in sys.modules if m == OWN_PACKAGE or m.startswith(OWN_PACKAGE + ".")]:
        del sys.modules[name]


# ------------------------------------------------------------------------------------ a fresh ClientApp

def read_token(stream: Any) -> str:
    """The task token, one line on ``stream`` (bytes)."""
    raw = stream.readline(TOKEN_LIMIT)
    token = raw.decode("ascii", errors="replace").strip()
    if not token or any(c.isspace() for c in token):
        raise ConfigError("no task token on standard input")
    return token


def main(argv: list[str] | None = None) -> None:
    """``python -m medfed.deploy.clientapp_gate [--entry MODULE:FUNCTION] FLWR_CLIENTAPP_ARGS``, the
    token on stdin: gate installed (the process exits 1 without its settings), Flower's object pulls
    tuned as in a forked ClientApp, medfed's modules dropped, then the entry (``flwr-clientapp``'s)
    run with ``sys.argv = ["flwr-clientapp", *ARGS, "--token", TOKEN]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    entry_ref = CLIENTAPP_ENTRY
    if argv[:1] == ["--entry"] and len(argv) >= 2:
        entry_ref, argv = argv[1], argv[2:]
    if "--token" in argv:
        raise SystemExit("the task token is read from standard input, never from the command line")
    try:
        token = read_token(sys.stdin.buffer)
        install(GateSettings.from_env())
    except MedfedError as exc:
        _log(str(exc))
        raise SystemExit(1) from None
    from medfed.flower_patches.flower_tuning import tune_object_pulls

    tune_object_pulls()  # as in a ClientApp forked from the warm zygote
    module, _, attr = entry_ref.partition(":")
    entry = getattr(importlib.import_module(module), attr)
    forget_own_modules()
    sys.argv = ["flwr-clientapp", *argv, "--token", token]
    entry()


if __name__ == "__main__":
    main()
