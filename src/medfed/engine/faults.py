"""Injected faults for simulation: sites that drop out of given rounds (``--drop SITE@ROUND``).

A deployment loses sites to crashes, timeouts and network cuts; a simulation gets the same
behaviour on purpose, so the round's handling of missing sites is testable in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from medfed.errors import ConfigError


@dataclass(frozen=True)
class Faults:
    """``drops[site]``: the rounds (0-based) in which the site sends nothing."""

    drops: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def dropped(self, site: str, round_: int) -> str | None:
        """Why ``site`` sends nothing in ``round_``, or None when it answers."""
        if round_ in self.drops.get(site, ()):
            return f"dropped out (fault injected with --drop {site}@{round_ + 1})"
        return None

    def __bool__(self) -> bool:
        return bool(self.drops)


def parse_drops(specs: Iterable[str], sites: Sequence[str] | None = None) -> Faults:
    """``["a@3", "b@2-4"]`` (1-based rounds, as printed in results) -> :class:`Faults`.

    Site names are checked against ``sites`` when given; a bad entry is one ConfigError."""
    drops: dict[str, set[int]] = {}
    for spec in specs:
        site, sep, rounds = str(spec).rpartition("@")
        low, _, high = rounds.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            first = last = 0
        if not sep or not site or first < 1 or last < first:
            raise ConfigError(
                f"--drop {spec!r}: expected SITE@ROUND or SITE@FIRST-LAST with rounds counted from 1, e.g. a@3"
            )
        if sites is not None and site not in sites:
            raise ConfigError(f"--drop {spec!r}: no site {site!r}; the sites are {', '.join(sites)}")
        drops.setdefault(site, set()).update(range(first - 1, last))
    return Faults({site: frozenset(r) for site, r in drops.items()})
