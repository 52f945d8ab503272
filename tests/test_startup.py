"""A deployed site starts one ClientApp process per message: its imports must stay lean."""

from __future__ import annotations

import subprocess
import sys


def test_the_client_app_imports_monai_without_transformers() -> None:
    code = "import sys, medfed.client_app, monai; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
