"""A site's errors reach the server without paths or file names (medfed.client.redaction)."""

from __future__ import annotations

import logging

import pytest
from conftest import make_metadata
from flwr.app import Context, Message, RecordDict

from medfed.client.redaction import SiteFailure, redact, redacted_errors_mod
from medfed.exceptions import DataError


@pytest.mark.parametrize(("text", "kept", "gone"), [
    ("data file '/data/patients/MRN-0042/scan.nii.gz' cannot be read", "cannot be read", ["MRN-0042", "/data", "scan"]),
    ("cannot open C:\\Scans\\Doe_John\\ct.dcm: denied", "denied", ["Doe_John", "Scans"]),
    ("ledger ~/kits/h1/ledger/h1.ledger.sqlite fails verification", "fails verification", ["kits", "h1.ledger"]),
    ("label 7 out of range in labels.csv row 12", "row 12", ["labels.csv"]),
    # quoted values go whole: a cell or a folder named after a patient, with spaces no path pattern would catch
    ("label must be a whole number; got 'SMITH JOHN 1960-01-01'", "must be a whole number", ["SMITH", "1960"]),
    ("class folder 'St Mary Doe Jane' holds no image", "holds no image", ["Doe", "Jane", "Mary"]),
    ('unknown key(s) "Jane Doe MRN 4711"', "unknown key(s)", ["Jane", "4711"]),
    ("case 'Smith_John/ct' of this site's table", "of this site's table", ["Smith_John"]),
])
def test_paths_and_file_names_are_replaced(text: str, kept: str, gone: list[str]) -> None:
    out = redact(text)
    assert kept in out and ("<path>" in out or "'…'" in out) and not [g for g in gone if g in out], out


def test_apostrophes_are_not_quotes() -> None:
    text = "site h2's data is 1x28x28 grayscale; the run's input is 3x28x28 RGB"
    assert redact(text) == text


def test_long_messages_are_cut() -> None:
    assert len(redact("x" * 5000)) == 400


def test_the_mod_logs_everything_at_the_site_and_sends_a_redacted_line(caplog: pytest.LogCaptureFixture) -> None:
    msg = Message(RecordDict(), metadata=make_metadata())

    def handler(m: Message, ctx: Context) -> Message:
        raise DataError("data file '/data/patients/MRN-0042/h1.npz' cannot be read: no train_images")

    with caplog.at_level(logging.ERROR, logger="medfed.site"):
        with pytest.raises(SiteFailure) as caught:
            redacted_errors_mod(msg, None, handler)
    said = str(caught.value)
    assert "MRN-0042" not in said and said.startswith("DataError: data file '…' cannot be read: no train_images")
    incident = said.split("incident ")[1].split(":")[0]
    assert "MRN-0042" in caplog.text and f"incident {incident}" in caplog.text  # the site's log keeps the story


def test_other_exceptions_reach_the_server_as_their_type_only() -> None:
    """A library's message may quote anything (a DICOM tag, a table cell): only its type leaves the site."""
    msg = Message(RecordDict(), metadata=make_metadata())

    def handler(m: Message, ctx: Context) -> Message:
        raise KeyError("PatientName=Doe^Jane MRN12345")

    with pytest.raises(SiteFailure, match=r"^KeyError \(incident [0-9a-f]{8}: details in the site's log\)$"):
        redacted_errors_mod(msg, None, handler)


def test_the_clientapp_runs_the_redaction_outermost() -> None:
    from medfed.client_app import app

    assert app._mods[0] is redacted_errors_mod
