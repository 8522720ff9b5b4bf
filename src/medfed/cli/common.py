"""What every ``medfed`` command shares: consoles, one-line errors, exit statuses, flag parsing."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from medfed.errors import ConfigError, MedfedError



class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich would exit with status 1 here; show() says instead that the results are written
        raise BrokenPipeError(errno.EPIPE, "the reader closed the pipe")


# outside a terminal (CI logs, pipes) a wide console keeps long lines greppable
console = _Console(width=None if sys.stdout.isatty() else 140)
err_console = _Console(stderr=True, width=None if sys.stderr.isatty() else 140)

# -h works wherever --help does
CONTEXT = {"help_option_names": ["-h", "--help"]}

# Exit statuses besides 0 (done) and 1 (a bug), in the README and `medfed --help`: whether
# the result files exist is what a script needs to know, so every status says it.
EXIT_BAD_INPUT = 2  # refused before any work (input, flags, output folder): nothing written
EXIT_STDOUT_LOST = 3  # finished and result files written, but stdout was closed or full
EXIT_NOT_WRITTEN = 4  # finished, but the result files could not be written: none written or changed
EXIT_AUDIT_FAILED = 5  # an audit's --fail-if-... threshold was crossed: its result files are written
EXIT_STATUSES = (
    "Exit status: 0 done (result files written); 2 refused before any work (bad input or output folder), "
    "nothing written; 3 result files written but stdout was closed or full (table not shown); "
    "4 finished but the result files could not be written, none written or changed; 5 an audit's "
    "--fail-if-... threshold was crossed (its result files written); 143 stopped by SIGTERM, "
    "nothing written; 1 an internal error."
)

# The command line that started this process (set by ``main``; None when medfed is called
# from Python), recorded in results.json.
COMMAND: str | None = None

# config keys and the flag a user types for them, for error messages
CONFIG_FLAGS = {
    "training.rounds": "--rounds", "training.local_steps": "--local-steps", "training.local_epochs": "--local-epochs",
    "training.lr": "--lr", "training.l2": "--l2", "training.batch_size": "--batch-size",
    "training.fraction_fit": "--fraction-fit", "training.min_sites": "--min-sites",
    "training.max_update_norm": "--max-update-norm", "repeats": "--repeats", "seed": "--seed",
    "scaling": "--scaling", "out": "--out", "plots": "--plots", "eval_every": "--eval-every", "workers": "--workers",
    "threads": "--threads", "loso": "--loso", "model": "--model", "methods": "--methods",
    "data.dataset": "--dataset", "data.path": "--data", "data.manifest": "--manifest",
    "data.path_column": "--path-column", "data.mask_column": "--mask-column", "data.kind": "--kind", "data.skip_bad": "--skip-bad",
    "data.site_column": "--site-column", "data.label_column": "--label-column", "data.label_columns": "--label-columns",
    "data.label_column_site": "--label-column-site",
    "data.split_column": "--split-column", "data.features": "--features", "data.impute": "--impute",
    "data.positive_label": "--positive-label", "data.task": "--task", "data.exclude": "--exclude", "data.categorical": "--categorical",
    "data.covariates": "--covariates", "data.unlabeled_value": "--unlabeled-value",
    "data.labeled_fraction": "--labeled-fraction", "data.labeled_fraction_site": "--labeled-fraction-site",
    "harmonize.method": "--harmonize", "harmonize.eb": "--no-eb",
    "harmonize.band": "--band", "harmonize.strength": "--strength",
    "plot_formats": "--plot-format", "overwrite": "--overwrite", "executor": "--executor", "ray_address": "--ray-address", "resume": "--resume",
    "drop": "--drop", "save_model": "--save-model", "privacy.dp": "--dp", "privacy.clip": "--clip",
    "privacy.noise": "--noise", "privacy.delta": "--delta", "privacy.target_epsilon": "--target-epsilon",
    "privacy.accountant": "--accountant", "privacy.adaptive_clip": "--adaptive-clip", "compress": "--compress",
    "privacy.secure_aggregation": "--secure-aggregation", "privacy.secure_threshold": "--secure-threshold",
    "privacy.secure_degree": "--secure-degree", "evaluation.threshold": "--threshold",
}


def flag_for(key: str) -> str | None:
    """The flag that sets config key ``key`` (``training.lr`` -> ``--lr``), None if none does."""
    if key in CONFIG_FLAGS:
        return CONFIG_FLAGS[key]
    head, _, rest = key.partition(".")
    if not rest:
        return None
    if head == "model_options":
        return f"--model-option {rest}=..."
    if key.startswith("data.options."):
        return f"--dataset-option {key.removeprefix('data.options.')}=..."
    if head == "method_options" and "." in rest:
        from medfed.methods.registry import METHOD_FLAGS  # the flags the methods' option schemas declare

        option = rest.split(".")[1]
        flag = f"--method-option {rest}=..."
        return f"{METHOD_FLAGS[option].flag} or {flag}" if option in METHOD_FLAGS else flag
    return None


def apply_threads(config) -> None:
    """``--threads N`` is the thread count torch models compute with (their ``threads`` option,
    filled in by the config); the numpy logistic model uses none, which a user should hear."""
    if config.threads is not None and config.model == "logistic":
        err_console.print("[yellow]warning:[/] --threads sets the threads torch models compute with; the numpy "
                          "logistic model does not use torch", highlight=False, soft_wrap=True)


def fail(message: str, status: int = EXIT_BAD_INPUT) -> NoReturn:
    with contextlib.suppress(OSError):  # a closed stderr too: the status still says it
        # a message may hold brackets (medfed[imaging], a column '[x]') that rich would read as markup
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(status)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def show(render: Callable[[], None], written: str | None = None) -> None:
    """Print to stdout; a closed pipe (``| head``) or a full device is one line on stderr and
    exit status 3 instead of a traceback. ``written`` says where the results already are."""
    try:
        render()
        sys.stdout.flush()
    except OSError as exc:
        _silence_stdout()
        where = f"; the result files are complete in {written}" if written else ""
        fail(f"could not print to stdout ({exc.strerror or exc}){where}", EXIT_STDOUT_LOST)


def write_results(write: Callable[[], list[Path]], out: Path) -> list[Path]:
    """Write the result files; an OS error now (the disk filled during the run) is one line
    and exit status 4: the writer renames nothing until every file is staged."""
    try:
        return write()
    except OSError as exc:
        from medfed.experiments.report import describe_os_error

        fail(f"could not write the results to {out}: {describe_os_error(exc)}; no result file was written or "
             "changed", EXIT_NOT_WRITTEN)


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


def compact(cell: str) -> str:
    """A metric cell without the spaces around ± (``0.795±0.055``): two columns narrower."""
    return cell.replace(" ± ", "±")


def stacked(cell: str) -> str:
    """A metric cell as mean over ±std on two lines, for the narrowest terminals."""
    return cell.replace(" ± ", "\n±")


def first_fitting(layouts: list[tuple[Callable[[], Any], bool]], out: Console) -> Any:
    """The first table of ``layouts`` (``(builder, wraps)``, widest first) that ``out`` shows at
    its width without cutting a cell; the last one if none does. A layout that ``wraps`` may
    wrap its text cells, so it fits when its narrowest rendering does (a number is one word
    and is never split); one that does not must fit on one line per row."""
    unbounded = out.options.update_width(1 << 20)  # a table measured at the width given fits by construction
    for build, wraps in layouts[:-1]:
        table = build()
        measured = out.measure(table, options=unbounded)
        if (measured.minimum if wraps else measured.maximum) <= out.width:
            return table
    return layouts[-1][0]()
