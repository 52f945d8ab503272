"""Errors medfed raises for bad user input. Each names the thing and the rule it broke."""


class MedfedError(Exception):
    """Base class: the CLI turns any of these into a one-line message and exit code 2."""


class ConfigError(MedfedError, ValueError):
    """A run setting is missing, of the wrong type, or outside its allowed range."""


class DataError(MedfedError, ValueError):
    """A data file is missing, unreadable, or does not follow the MedMNIST layout."""


class SplitError(MedfedError, ValueError):
    """The requested division of data into sites cannot be made."""


class FederationError(MedfedError, RuntimeError):
    """A federated round could not complete (for example, every site failed)."""


class TrainingDiverged(MedfedError, FloatingPointError):
    """The training loss became NaN or infinite (usually a learning rate too high)."""


class PrivacyBudgetExceeded(MedfedError, RuntimeError):
    """A DP round would take a site past its lifetime (epsilon, delta) budget, so it is refused."""


class LedgerError(MedfedError, RuntimeError):
    """A privacy ledger is missing, unreadable, tampered with, or signed by another key."""
