"""What a site says about its own failures: everything in the site's own log, and to the server only a
redacted line.

A ClientApp exception reaches the coordinating centre as the text of an error reply (Flower's
``run_clientapp`` sends ``str(type(exc))`` and ``str(exc)``). Messages name files (a data file's
path, a ledger's, a DICOM folder named after a patient), and patient identifiers must never leave
a site, not even in an error. `redacted_errors_mod` is the ClientApp's outermost mod: it logs the
full traceback at the site under a random incident id and re-raises the error as a `SiteFailure`
the server may read: for medfed's own errors (whose messages medfed writes: settings, shapes,
rules) the message with every quoted value blanked and every path and file name replaced by
``<path>``; for any other exception (a library's message may quote anything, a file name, a DICOM
tag, a table cell) only its type.
Either way the incident id lets the site find the full story in its own log.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

from medfed.exceptions import MedfedError

log = logging.getLogger("medfed.site")

# absolute or home-relative paths (POSIX or Windows), and bare file names with a data/key/ledger suffix
_PATH = re.compile(r"(?:~|[A-Za-z]:)?(?:[/\\][^\s'\"<>|,;()\[\]{}]+)+")
_FILE = re.compile(r"\b[\w.-]+\.(?:npz|npy|nii(?:\.gz)?|dcm|dicom|png|jpe?g|tiff?|bmp|csv|tsv|json|toml|sqlite|db|"
                   r"pem|key|crt|safetensors|pt|fab|log|txt)\b", re.IGNORECASE)
_QUOTED = re.compile(r"(?<![\w'])'[^'\n]*'(?![\w])|(?<![\w\"])\"[^\"\n]*\"(?![\w])")
"""A quoted value ('x' or "x", not the apostrophe of "site's"): a table cell, a file or folder name, a key."""
MAX_REASON = 400


class SiteFailure(Exception):
    """A site's failure as the server may see it: the exception's type and its redacted message."""


def redact(text: str) -> str:
    """``text`` with quoted values replaced by ``'…'`` and paths and file names by ``<path>``, at most
    `MAX_REASON` characters. Quoted values go first: medfed quotes what it did not write itself (a table's cell, a
    file or folder name, a datalist's key), which may hold a patient's name with spaces no path pattern catches."""
    text = _FILE.sub("<path>", _PATH.sub("<path>", _QUOTED.sub("'…'", text)))
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def server_view(exc: BaseException, incident: str) -> str:
    """What the server may read of ``exc``: see the module docstring."""
    said = f": {redact(str(exc))}" if isinstance(exc, MedfedError) else ""
    return f"{type(exc).__name__}{said} (incident {incident}: details in the site's log)"


def redacted_errors_mod(msg: Any, context: Any, call_next: Any) -> Any:
    """Flower ClientApp mod: the full error in the site's log, a redacted `SiteFailure` to the server."""
    try:
        return call_next(msg, context)
    except Exception as exc:
        incident = secrets.token_hex(4)
        log.exception("incident %s: the ClientApp failed on a %s message", incident, msg.metadata.message_type)
        raise SiteFailure(server_view(exc, incident)) from None
