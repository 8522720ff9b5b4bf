"""Options declared once and checked once: what a method or a pipeline step takes.

A method (and each server step a config pipeline may list) declares its options as a tuple
of :class:`Option`: name, default, type, allowed range or choices, the command-line flag that
sets it (if any) and a one-line help. :func:`validate` checks what a config file,
``--method-option`` or a flag gave against that schema when the study is built — unknown
names, types, ranges, choices — and returns every option, defaults filled in and cast to its
type, so the code that builds a method reads values that are already valid (scikit-learn's
parameter constraints, checked up front). Checks that depend on the federation (the site
names of a per-site table) stay where the federation is known, in the method's build.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal

from medfed.errors import ConfigError

OptionType = Literal["float", "int", "bool", "str", "choice", "per_site"]
OptionValue = float | int | bool | str | dict[str, float]


@dataclass(frozen=True)
class Range:
    """An interval of numbers; ``None`` leaves a side unbounded. Endpoints are closed unless
    marked open; infinity is inside only as a closed infinite endpoint (``Range(0, math.inf,
    low_open=True)`` is ``(0, inf]``), so NaN and, by default, infinities are refused."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        above = value > low if self.low_open or self.low is None else value >= low
        below = value < high if self.high_open or self.high is None else value <= high
        return above and below  # NaN fails both

    def __str__(self) -> str:
        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def at_least(low: float) -> Range:
    return Range(low)


def above(low: float) -> Range:
    return Range(low, low_open=True)


def closed(low: float, high: float) -> Range:
    return Range(low, high)


@dataclass(frozen=True)
class Option:
    """One option: ``type`` is ``float``, ``int``, ``bool``, ``str``, ``choice`` (one of
    ``choices``) or ``per_site`` (a table site name -> number; ``range`` bounds each number).
    ``flag`` (e.g. ``"--mu"``) makes it a command-line flag that sets the option of every
    method run that declares it. ``help`` is one line; its part before a ``;`` says what the
    option is in general (the flag's help), the rest what it means for this method."""

    name: str
    default: OptionValue
    type: OptionType
    help: str
    range: Range = Range()
    choices: tuple[str, ...] = ()
    flag: str | None = None

    def but(self, **changes: Any) -> Option:
        """This option with some fields changed (another default, a flag, a method's own name)."""
        return dataclasses.replace(self, **changes)

    def allowed(self) -> str:
        """What the option takes, in words (``a number in [0, 1]``)."""
        bound = f" {self.range}" if str(self.range) else ""
        return {
            "float": f"a number{bound}",
            "int": f"a whole number{bound}",
            "bool": "true or false",
            "str": "a string",
            "choice": f"one of {', '.join(self.choices)}",
            "per_site": f"a table of site name = number{bound}",
        }[self.type]

    def coerce(self, value: Any, subject: str) -> OptionValue:
        """``value`` cast to the option's type, or one ConfigError naming ``subject`` (``method
        'fedprox'``), the option and what it takes."""
        problem = f"{subject} option {self.name!r} must be {self.allowed()}"
        if self.type == "per_site":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{problem}, got {value!r}")
            out = {}
            for site, number in value.items():
                if not (_is_number(number) and float(number) in self.range):
                    raise ConfigError(f"{problem}; site {site!r} has {number!r}")
                out[str(site)] = float(number)
            return out
        if self.type == "bool":
            ok = isinstance(value, bool)
        elif self.type == "str":
            ok = isinstance(value, str)
        elif self.type == "choice":
            ok = isinstance(value, str) and value in self.choices
        elif self.type == "int":
            ok = _is_number(value) and float(value).is_integer() and int(value) in self.range
            value = int(value) if ok else value
        else:
            ok = _is_number(value) and float(value) in self.range
            value = float(value) if ok else value
        if not ok:
            raise ConfigError(f"{problem}, got {value!r}")
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def number(name: str, default: float, help: str, *, range: Range = Range(), flag: str | None = None) -> Option:
    return Option(name, float(default), "float", help, range, flag=flag)


def whole(name: str, default: int, help: str, *, range: Range = Range(), flag: str | None = None) -> Option:
    return Option(name, int(default), "int", help, range, flag=flag)


def boolean(name: str, default: bool, help: str) -> Option:
    return Option(name, default, "bool", help)


def choice(name: str, default: str, choices: Sequence[str], help: str) -> Option:
    return Option(name, default, "choice", help, choices=tuple(choices))


def per_site(name: str, help: str, *, range: Range = Range()) -> Option:
    return Option(name, {}, "per_site", help, range)


def defaults(schema: Sequence[Option]) -> dict[str, OptionValue]:
    """Each option's default (a fresh dict for per-site tables)."""
    return {o.name: dict(o.default) if isinstance(o.default, dict) else o.default for o in schema}


def validate(
    subject: str,
    schema: Sequence[Option],
    given: Mapping[str, Any],
    check: Callable[[Mapping[str, Any]], str | None] | None = None,
) -> dict[str, OptionValue]:
    """Every option of ``schema``: the given values checked and cast, the defaults for the rest.

    ``subject`` names the owner in messages (``method 'krum'``, ``pipelines.p: step 'median'``);
    ``check`` sees the complete options and says what is wrong between them (PFA's
    ``start <= end``), or None.
    """
    known = {o.name: o for o in schema}
    out = defaults(schema)
    for key, value in given.items():
        if key not in known:
            raise ConfigError(f"{subject} has no option {key!r}; its options: {', '.join(known) or 'none'}")
        out[key] = known[key].coerce(value, subject)
    problem = check(out) if check is not None else None
    if problem:
        raise ConfigError(f"{subject}: {problem}")
    return out
