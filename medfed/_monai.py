"""Import MONAI without Hugging Face ``transformers``: seconds saved in every ClientApp process.

MONAI's package init imports every network it has, and TransChex imports BERT from
``transformers`` when that is installed (it is: peft depends on it). That alone costs about 2 s
of CPU per process (docs/RESULTS.md, deployment_overhead), and Flower's deployment runtime starts a
fresh ClientApp process for every message. medfed never uses TransChex, so while MONAI is first
imported, ``transformers`` is made unimportable; MONAI's ``optional_import`` then marks TransChex
unavailable. Afterwards nothing is blocked: peft imports ``transformers`` normally when LoRA is used.
"""

from __future__ import annotations

import importlib.abc
import sys


class _BlockTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("transformers is not imported while MONAI loads (medfed does not use TransChex)")


def import_monai() -> None:
    """Import MONAI (once) without letting it import ``transformers``."""
    if "monai" in sys.modules or "transformers" in sys.modules:
        return
    blocker = _BlockTransformers()
    sys.meta_path.insert(0, blocker)
    try:
        import monai  # noqa: F401  (imported for its side effect: MONAI loaded with transformers blocked)
    finally:
        sys.meta_path.remove(blocker)


import_monai()
