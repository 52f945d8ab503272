"""Errors medfed raises for bad user input. Each names the thing and the rule it broke."""


class MedfedError(Exception):
    """Base class: the CLI turns any of these into a one-line message and exit code 2."""


class ConfigError(MedfedError, ValueError):
    """A run setting is missing, of the wrong type, or outside its allowed range."""


class DataError(MedfedError, ValueError):
    """A data file is missing, unreadable, or does not follow the MedMNIST layout."""


class DataMismatch(DataError):
    """A site's data do not fit the run's input (channels, image size, 2D/3D, task or class count); the
    message names only shapes and tasks, so a site can send it to the server as its refusal."""


class SplitError(MedfedError, ValueError):
    """The requested division of data into sites cannot be made."""


class FederationError(MedfedError, RuntimeError):
    """A federated round could not complete (for example, every site failed)."""


class TrainingDiverged(MedfedError, FloatingPointError):
    """The training loss became NaN or infinite (usually a learning rate too high)."""


class PrivacyBudgetExceeded(MedfedError, RuntimeError):
    """A DP round would take a site past its lifetime (epsilon, delta) budget, so it is refused."""


class LedgerError(MedfedError, RuntimeError):
    """A privacy ledger is missing, unreadable, tampered with, or signed by another key.

    ``kind`` says what went wrong in words a site may send to the server: never a path or a row's
    contents (those stay in the message, which the site logs locally).
    """

    kind = "cannot be read or written"


class LedgerVerificationError(LedgerError):
    """A privacy ledger (or its anchor) failed verification: edited, reordered, truncated, or of another key or site."""

    kind = "failed verification"


class LedgerResetError(LedgerError):
    """A privacy ledger is missing or behind what its signing key already signed (deleted, reset or rolled
    back): starting again from it would reset the site's privacy budget."""

    kind = "is missing or behind the releases its signing key already signed (reset or rolled back)"


class AppNotApproved(MedfedError, PermissionError):
    """A site refused to run a Flower app (FAB) whose sha256 is not in its approved apps
    (`medfed site approve`); the message names the site and the app's hash, never a path."""


class RunLogError(MedfedError, RuntimeError):
    """A site's run log is unreadable or failed verification (an entry edited, deleted, inserted or reordered)."""
