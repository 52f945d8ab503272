"""The machinery of a settings part: a frozen dataclass whose fields carry their flat key, help and audience.

Each part (`medfed.config.parts`) owns its defaults, help text and checks. Its fields declare:

* the **flat key** they have in Flower's run config, in ``config.json`` and as a CLI flag (``--KEY``):
  the part's `Part.PREFIX` plus the field's name in kebab-case, unless the field names its own;
* a line of **help**;
* whether **sites** need it: the ServerApp's messages carry only the settings a site trains by
  (`medfed.config.RunConfig.site_settings`), not the centre's (output folder, registry, aggregation). In a
  deployment Flower itself also hands every SuperNode the run's whole run config (``context.run_config``,
  which a site's app gate hashes into its run log); medfed's site code does not read it.

A value's type is its field's annotation (``int``, ``float``, ``str``, ``bool`` or a `StrEnum` of
choices); flat values are coerced to it with a clear `ConfigError` naming the key and the rule.
"""

from __future__ import annotations

import math
import typing
from dataclasses import Field, dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

from medfed.exceptions import ConfigError

FlatValue = bool | int | float | str


# `help` shadows the builtin: it is the flag's
def setting(default: Any, help: str, *, key: str = "", site: bool = True) -> Any:
    """A settings field: its default, one line of help, its flat key ('' = the part's prefix + its name) and
    whether a site needs it."""
    return field(default=default, metadata={"help": help, "key": key, "site": site})


@dataclass(frozen=True)
class Setting:
    """What a flat key names: the part, the field, its type, help, default and audience."""

    key: str
    part: str
    name: str
    type: type
    help: str
    default: FlatValue
    site: bool

    def coerce(self, value: Any) -> Any:
        """``value`` as this setting's type (ints accepted for floats, integral floats for ints), else `ConfigError`.

        Raises:
            ConfigError: the wrong type, or a value that is not one of the setting's choices.
        """
        target = self.type
        if isinstance(target, type) and issubclass(target, StrEnum):
            if isinstance(value, str) and value in {c.value for c in target}:
                return target(value)
            raise ConfigError(f"{self.key} must be one of {', '.join(c.value for c in target)}; got {value!r}")
        if target is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if target is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, target) or (target is int and isinstance(value, bool)):
            raise ConfigError(f"setting {self.key!r} must be of type {target.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{self.key} must be a finite number; got {value}")
        return value


class Part:
    """Base of a frozen settings part. Subclasses are ``@dataclass(frozen=True)`` and implement `check`."""

    PREFIX: ClassVar[str] = ""
    TITLE: ClassVar[str] = ""  # the part's heading in `medfed simulate --help` and in a run.toml

    def __post_init__(self) -> None:
        for s in self.settings():  # types first (flags and files arrive as strings and numbers)
            object.__setattr__(self, s.name, s.coerce(getattr(self, s.name)))
        self.check()

    def check(self) -> None:
        """Raise `ConfigError` naming the setting and the rule when a value is out of its range."""

    @classmethod
    def settings(cls) -> list[Setting]:
        """The part's settings, in declaration order."""
        hints = typing.get_type_hints(cls)
        return [_describe(cls, f, hints[f.name]) for f in fields(cls)]  # type: ignore[arg-type]

    def flat(self) -> dict[str, FlatValue]:
        """This part's values by flat key (enums as their string values)."""
        return {s.key: _plain(getattr(self, s.name)) for s in self.settings()}



def _describe(cls: type[Part], f: Field[Any], annotation: Any) -> Setting:
    key = f.metadata.get("key") or cls.PREFIX + f.name.replace("_", "-")
    return Setting(key=key, part="", name=f.name, type=annotation, help=f.metadata.get("help", ""),
                   default=_plain(f.default), site=f.metadata.get("site", True))


def _plain(value: Any) -> FlatValue:
    return value.value if isinstance(value, StrEnum) else value
