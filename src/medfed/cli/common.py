"""What every ``medfed`` command shares: consoles, one-line errors, flag parsing."""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console

from medfed.errors import ConfigError, MedfedError

# outside a terminal (CI logs, pipes) rich would wrap at 80 columns and split the table cells
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _parse_options(items: list[str] | None, flag: str) -> dict[str, Any]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    return out


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_method_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``--method-option METHOD.KEY=VALUE`` flags as ``{method: {key: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in _parse_options(items, "--method-option").items():
        if "." not in key:
            raise ConfigError(f"--method-option takes METHOD.KEY=VALUE, got {key!r}")
        name, opt = key.split(".", 1)
        out.setdefault(name, {})[opt] = value
    return out


def _guard(fn, *args):
    """Run ``fn``; a MedfedError becomes one red line and exit status 2."""
    try:
        return fn(*args)
    except MedfedError as exc:
        _fail(str(exc))
