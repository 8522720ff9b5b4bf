"""Checks of embedded data sets' options: one ConfigError naming the option and what it takes.

Options arrive from Python, from ``[data.options]`` in a config file or from
``--dataset-option KEY=VALUE`` (where ``seed=abc`` stays the text ``'abc'``), so every loader
checks type and range itself, before any work, with these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medfed.errors import ConfigError


def _option(name: str) -> str:
    return f"option {name!r} (--dataset-option {name}=...)"


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """A whole number in ``[low, high]`` (booleans and floats are refused)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an integer ≥ {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ConfigError(f"{_option(name)} must be {allowed}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    v = float(value) if ok else math.nan
    if not (math.isfinite(v) and (v > low if low_open else v >= low) and v <= high):
        bound = f"> {low:g}" if low_open else f"≥ {low:g}"
        allowed = f"a finite number {bound}" if math.isinf(high) else (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
        )
        raise ConfigError(f"{_option(name)} must be {allowed}, got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{_option(name)} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def names_list(value: Any) -> list[Any] | Any:
    """``"a,b"`` (how a command-line option spells a list) as ``["a", "b"]``; others unchanged."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value
