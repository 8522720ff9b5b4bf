"""Injected faults for simulation: sites that drop out of given rounds (``--drop SITE@ROUND``).

Under secure aggregation a site may also drop in the middle of a round, ``SITE@ROUND:STAGE``:
it answers the round's stages before ``STAGE`` (``share``, ``mask`` or ``unmask``) and nothing
from it on (``a@2:mask``: its shares went out, its masked vector never arrives).

A deployment loses sites to crashes, timeouts and network cuts; a simulation gets the same
behaviour on purpose, so the round's handling of missing sites is testable in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from medfed.errors import ConfigError

STAGES = ("train", "share", "mask", "unmask")  # a round's exchanges under secure aggregation, in order


@dataclass(frozen=True)
class Faults:
    """``drops[site]``: the rounds (0-based) in which the site sends nothing; ``late[site][round]``:
    the secure-aggregation stage from which it sends nothing in that round."""

    drops: Mapping[str, frozenset[int]] = field(default_factory=dict)
    late: Mapping[str, Mapping[int, str]] = field(default_factory=dict)

    def dropped(self, site: str, round_: int, stage: str = "train") -> str | None:
        """Why ``site`` sends nothing at ``stage`` of ``round_``, or None when it answers."""
        if round_ in self.drops.get(site, ()):
            return f"dropped out (fault injected with --drop {site}@{round_ + 1})"
        first = self.late.get(site, {}).get(round_)
        if first is not None and STAGES.index(stage) >= STAGES.index(first):
            return f"dropped out at the {first} stage (fault injected with --drop {site}@{round_ + 1}:{first})"
        return None

    def __bool__(self) -> bool:
        return bool(self.drops) or bool(self.late)


def parse_drops(specs: Iterable[str], sites: Sequence[str] | None = None) -> Faults:
    """``["a@3", "b@2-4", "c@2:mask"]`` (1-based rounds, as printed in results) -> :class:`Faults`.

    Site names are checked against ``sites`` when given; a bad entry is one ConfigError."""
    drops: dict[str, set[int]] = {}
    late: dict[str, dict[int, str]] = {}
    for spec in specs:
        site, sep, rounds = str(spec).rpartition("@")
        rounds, colon, stage = rounds.partition(":")
        if colon and stage not in STAGES[1:]:
            raise ConfigError(f"--drop {spec!r}: the stage after ':' must be one of {', '.join(STAGES[1:])} "
                              "(secure aggregation's exchanges after train)")
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
        if colon:
            late.setdefault(site, {}).update((r, stage) for r in range(first - 1, last))
        else:
            drops.setdefault(site, set()).update(range(first - 1, last))
    return Faults({site: frozenset(r) for site, r in drops.items()}, late)
