"""Write one benchmark's section of docs/RESULTS.md, between its own markers, leaving the rest."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
HEADER = (
    "# Measured results\n\nEvery figure here was written by the script named beside it; re-run the command to "
    "reproduce it. Compare numbers as ratios within one section: the machines are noisy.\n"
)


def write_section(name: str, text: str, path: Path = RESULTS) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    path.parent.mkdir(exist_ok=True)
    current = path.read_text() if path.exists() else HEADER
    block = f"{start}\n{text}\n{end}"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)
