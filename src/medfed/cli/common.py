"""What every ``medfed`` command shares: consoles, one-line errors, flag parsing."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import typer
from rich.console import Console

from medfed.errors import ConfigError, MedfedError

# outside a terminal (CI logs, pipes) rich would wrap at 80 columns and split the table cells
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def fail(message: str) -> None:
    from rich.markup import escape  # a message may hold brackets: medfed[imaging], a column '[x]'

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_options(items: list[str] | None, flag: str) -> dict[str, Any]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_method_options(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``--method-option METHOD.KEY=VALUE`` flags as ``{method: {key: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_options(items, "--method-option").items():
        if "." not in key:
            raise ConfigError(f"--method-option takes METHOD.KEY=VALUE, got {key!r}")
        name, opt = key.split(".", 1)
        out.setdefault(name, {})[opt] = value
    return out


def guard(fn, *args):
    """Run ``fn``; a MedfedError becomes one red line and exit status 2."""
    try:
        return fn(*args)
    except MedfedError as exc:
        fail(str(exc))


@contextlib.contextmanager
def progress_steps(total: int):
    """A progress bar on stderr (terminals only) and the ``step(label)`` callback the library
    calls as each piece of work starts; each call completes the previous piece."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err_console, transient=True, disable=not err_console.is_terminal,
    ) as progress:
        task = progress.add_task("training", total=total)
        started = {"n": 0}

        def step(label: str) -> None:
            if started["n"]:
                progress.advance(task)
            started["n"] += 1
            progress.update(task, description=label)

        yield step
        progress.advance(task)
