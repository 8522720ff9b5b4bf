"""``medfed harmonize``: remove site effects from a feature table before anything learns from it.

``medfed harmonize combat`` is federated ComBat (:mod:`medfed.data.harmonize`): each site's
statistics, the pooled fit, each site adjusting its own rows. It writes the harmonized table
and ``combat.json`` (the fitted parameters) beside it, both at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medfed.cli.common import CONTEXT, console, guard, show, split_list, write_results
from medfed.errors import ConfigError

harmonize_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
    help="Harmonize a feature table across sites: `medfed harmonize combat` (federated ComBat).",
)

MODEL_FILE = "combat.json"


def execute_combat(args: dict[str, Any], out: Path) -> None:
    """Check the output name, fit and apply, write the table and ``combat.json`` atomically,
    summarize."""
    from medfed.cli.features import CSV_OUT, PARQUET_OUT, table_bytes
    from medfed.data.harmonize import harmonize_table
    from medfed.experiments.harmonization import between_site_variance_ratio
    from medfed.experiments.report import output_dir, write_atomically

    if out.suffix.lower() not in PARQUET_OUT + CSV_OUT:
        raise ConfigError(f"--out must end in {', '.join(PARQUET_OUT + CSV_OUT)} (Parquet or CSV), got {out.name!r}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name ending in .csv or .parquet")
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {out} is a symbolic link to {os.readlink(out)!r}, which does not exist")
    if out.name == MODEL_FILE:
        raise ConfigError(f"--out may not be named {MODEL_FILE}: the fitted parameters are written under that name")
    data = Path(args["path"])
    if data.exists() and out.exists() and os.path.samefile(data, out):
        raise ConfigError(f"--out {out} is the --data file; write the harmonized table to a new file")
    with output_dir(out.parent, "--out's folder"):
        result = harmonize_table(**args)
        files = {out.name: lambda: table_bytes(result.frame, out),
                 MODEL_FILE: lambda: (json.dumps(result.model.to_json(), indent=2) + "\n").encode()}
        written = write_results(lambda: write_atomically(out.parent, files, as_set=False), out.parent)
    before = between_site_variance_ratio(list(result.before.values()))
    after = between_site_variance_ratio(list(result.after.values()))
    show(lambda: render_summary(result, before, after, written), str(out))


def render_summary(result, before, after, written: list[Path]) -> None:
    model = result.model
    console.print(
        f"federated ComBat ({'empirical Bayes' if model.eb else 'no EB'}) of {len(model.features)} feature(s), "
        f"preserving {', '.join(model.covariates) or 'no covariates'}", highlight=False, soft_wrap=True)
    table = Table()
    for col in ("Site", "Rows", "Mean |location|", "Mean scale"):
        table.add_column(col, justify="left" if col == "Site" else "right", no_wrap=True)
    for e in model.sites:
        table.add_row(e.site, str(e.n), f"{abs(e.gamma_star).mean():.3f}", f"{e.delta_star.mean():.3f}")
    console.print(table)
    console.print(f"between-site share of variance (mean over features): {before.mean():.4f} -> {after.mean():.4f}",
                  highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False, soft_wrap=True)


@harmonize_app.command("combat")
def combat(
    data: Annotated[Path, typer.Option(help="CSV or Parquet table, one row per subject")],
    site_column: Annotated[str, typer.Option(help="column naming each row's site")],
    out: Annotated[Path, typer.Option(help="the harmonized table: .csv, .tsv or .parquet (combat.json beside it)")],
    covariates: Annotated[str | None, typer.Option(help="comma-separated numeric columns to preserve, e.g. age,sex")] = None,
    features: Annotated[str | None, typer.Option(help="comma-separated feature columns [default: all but the site, label and covariates]")] = None,
    label_column: Annotated[str | None, typer.Option(help="the label column: kept as it is, never a feature or covariate")] = None,
    eb: Annotated[bool, typer.Option("--eb/--no-eb", help="empirical-Bayes site effects (--no-eb: per-site moments)")] = True,
) -> None:
    """Federated ComBat (Johnson et al., 2007; Fortin et al., 2018; Chen et al., 2022): site effects removed
    from each site's statistics, the covariates' effects kept."""
    args = {"path": data, "site_column": site_column, "covariates": split_list(covariates) or (),
            "features": split_list(features), "label_column": label_column, "eb": eb}
    guard(execute_combat, args, out)
