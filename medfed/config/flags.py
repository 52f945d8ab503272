"""Command-line flags for the settings, derived from the parts (one ``--KEY`` per flat key, its part's help),
and the rule that resolves them: defaults, then a run.toml (``--config``), then the flags given.

A flag's default is "not given" (None), so that a flag left out does not override the file; its help says
the setting's default. Choices are the setting's enum, shown by ``--help``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Optional

import typer

from medfed.config.run import RunConfig, read_toml
from medfed.exceptions import ConfigError

CONFIG_HELP = ("A run.toml (a run directory's config.toml reproduces that run); flags given beside it override "
               "its values.")


def setting_parameters(
    *, skip: Iterable[str] = (), defaults: Mapping[str, Any] | None = None
) -> list[inspect.Parameter]:
    """One keyword-only typer option per setting (named as its flat key in snake_case), grouped by part in
    ``--help``; ``skip`` leaves settings out, ``defaults`` changes the default the help shows."""
    skip, defaults = set(skip), dict(defaults or {})
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],  # noqa: UP045
                                default=typer.Option(None, "--config", help=CONFIG_HELP))]
    for key, (part, s) in RunConfig.settings().items():
        name = key.replace("-", "_")
        if name in skip:
            continue
        default = defaults.get(name, s.default)
        shown = default.value if isinstance(default, StrEnum) else default
        help_text = f"{s.help} (default: {shown if shown != '' else 'none'})"
        names = [f"--{key}/--no-{key}"] if s.type is bool else [f"--{key}"]
        annotation: object = Optional[s.type]  # noqa: UP045 (typer reads typing.Optional)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(None, *names, help=help_text, rich_help_panel=part)))
    return params


def settings_from_flags(config: str | None, flags: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None
                        ) -> RunConfig:
    """The run's settings: ``defaults`` (over the built-in ones), then the ``config`` file's, then the flags given.

    Raises:
        ConfigError: a bad file, or bad values.
    """
    flat = {key.replace("_", "-"): value for key, value in (defaults or {}).items()}
    if config:
        flat |= read_toml(config)
    flat |= {key.replace("_", "-"): value for key, value in flags.items() if value is not None}
    try:
        return RunConfig.from_flat(flat)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (config file {config})" if config else str(exc)) from None
