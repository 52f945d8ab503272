"""Patch: Flower's SuperExec loop with an executor of medfed's own.

``flower-superexec`` builds its executor with ``run_superexec.get_executor`` and then polls the
Runtime API for tasks. medfed keeps that loop and swaps only the executor: the centre's ServerApp
launcher (`medfed.deploy.serverapp_exec`, each task's token on stdin) and a site's warm ClientApp
launcher (`medfed.deploy.warm_exec`, forks of a pre-imported zygote, each behind the app gate).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_superexec_with(executor: Any, *, runtime_api_address: str, auth_secret_file: str | Path | None,
                       parent_pid: int | None, insecure: bool = True, root_certificates: str | None = None) -> None:
    """Run Flower's SuperExec loop with ``executor`` (Flower's Executor protocol), dependencies never
    installed at run time (`runtime_dependency_install=False`: a site's environment is what it approved).

    Raises:
        RuntimeError: this Flower no longer builds its executor through ``run_superexec.get_executor``.
    """
    import flwr.supercore.superexec.run_superexec as superexec
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret

    if not hasattr(superexec, "get_executor"):  # the one seam this relies on (checked by tests/test_flower_patches.py)
        raise RuntimeError("flwr.supercore.superexec.run_superexec.get_executor is gone: not the pinned flwr")
    superexec.get_executor = lambda *_, **__: executor
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=insecure,
                            root_certificates_path=root_certificates,
                            superexec_auth_secret=load_superexec_auth_secret(
                                None if auth_secret_file is None else str(auth_secret_file)),
                            parent_pid=parent_pid, runtime_dependency_install=False)
