"""The ``medfed`` command: ``reproduce``, ``run``, ``datasets``, ``methods``.

Errors medfed raises on purpose are printed as one line and exit with status 2; the
library does all the work, this module only parses, renders and writes.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medfed.cli.audit import audit_app
from medfed.cli.common import (
    console,
    err_console,
    guard,
    parse_method_options,
    parse_options,
    progress_steps,
    split_list,
)
from medfed.cli.features import features_app
from medfed.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="medfed: federated learning for medical image analysis (Guan & Liu's survey, measured).",
)
app.add_typer(audit_app, name="audit", help="Audits under attack: `medfed audit robustness` compares defenses.")
app.add_typer(features_app, name="features", help="Feature tables from images: `medfed features roi` extracts atlas-region means.")


def render_table(doc: dict[str, Any]) -> None:
    from medfed.experiments.results import table_rows

    table = Table(
        title=f"{doc['dataset']}: mean ± std over {doc['repeats']} repeat(s), seed {doc['seed']}",
        title_justify="left",
    )
    for col in ("Test site", "Setting", "ACC", "SEN", "SPE", "AUC"):
        table.add_column(col, justify="left" if col in ("Test site", "Setting") else "right", no_wrap=True)
    previous = None
    notes = []
    for row in table_rows(doc):
        if previous is not None and row["test_site"] != previous:
            table.add_section()
        label = row["label"]
        if row["notes"]:
            notes.append(f"{row['test_site']} / {label}: " + "; ".join(row["notes"]))
            label += f" [{len(notes)}]"
        table.add_row(row["test_site"] if row["test_site"] != previous else "", label, *row["cells"])
        previous = row["test_site"]
    console.print(table)
    for i, note in enumerate(notes, 1):
        console.print(f"[dim][{i}] {note}[/]", highlight=False)
    from medfed.experiments.results import communication_lines, data_note_lines, server_note_lines

    for line in communication_lines(doc):
        console.print(f"[dim]{line}[/]", highlight=False, soft_wrap=True)
    for line in data_note_lines(doc):
        console.print(f"[yellow]data:[/] {line}", highlight=False, soft_wrap=True)
    for line in server_note_lines(doc):
        console.print(f"[yellow]server:[/] {line}", highlight=False, soft_wrap=True)
    for w in doc["warnings"]:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)


def execute(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate, run with a progress bar, write the report atomically, render; return the doc."""
    from medfed.experiments.config import build_config
    from medfed.experiments.harness import load_federation, run_experiment
    from medfed.experiments.report import report_files, write_atomically
    from medfed.experiments.results import results_document

    config = build_config(values, source)
    if config.out is None:
        raise ConfigError("no output folder: give --out DIR (or out = \"DIR\" in the config file)")
    federation = load_federation(config.data)
    total = config.repeats * len(config.methods)
    with progress_steps(total) as step:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # single-class notes are rendered with the table
            run = run_experiment(config, federation, progress=step)
    doc = results_document(run)
    written = write_atomically(config.out, report_files(doc, run, plots=config.plots))
    render_table(doc)
    console.print(
        f"[dim]{run.runtime_s:.2f} s; wrote {', '.join(p.name for p in written)} to {config.out}[/]",
        highlight=False,
    )
    return doc


def method_flag_options(names: list[str] | None, flags: dict[str, tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    """Options given as common flags (``--mu``, ``--server-lr``, ...), for every selected method
    that declares the option as a flag; a flag no selected method takes is an error."""
    from medfed.experiments.config import DEFAULT_METHODS
    from medfed.experiments.methods import METHODS

    selected = [METHODS[n.strip().lower()] for n in (names or DEFAULT_METHODS) if n.strip().lower() in METHODS]
    out: dict[str, dict[str, Any]] = {}
    for option, (flag, value) in flags.items():
        if value is None:
            continue
        takers = [m.name for m in selected if option in m.flags]
        if not takers:
            allowed = [m.name for m in METHODS.values() if option in m.flags]
            raise ConfigError(f"{flag} sets an option of {', '.join(allowed)}; none of them is among the methods run")
        for name in takers:
            out.setdefault(name, {})[option] = value
    return out


MethodsOpt = Annotated[
    str | None, typer.Option("--methods", help="comma-separated method names (see `medfed methods`)")
]


@app.command()
def reproduce(
    dataset: Annotated[str, typer.Option(help="embedded data set (see `medfed datasets`)")] = "adni-like",
    repeats: Annotated[int, typer.Option(help="repeated stratified 80/20 splits")] = 5,
    seed: Annotated[int, typer.Option(help="seed of splits and training")] = 0,
    out: Annotated[Path | None, typer.Option(help="output folder [default: results/<dataset>]")] = None,
    plots: Annotated[bool, typer.Option("--plots", help="also write ROC and convergence PNGs")] = False,
    methods: MethodsOpt = None,
    loso: Annotated[bool, typer.Option("--loso", help="also test each site as unseen: train without it")] = False,
) -> None:
    """Reproduce the survey's Table 2 (Cross, Single, Mix, FedAvg, FedSGD, FedProx) on embedded data."""
    values: dict[str, Any] = {
        "data": {"dataset": dataset},
        "repeats": repeats,
        "seed": seed,
        "out": str(out or Path("results") / dataset),
        "plots": plots,
        "loso": loso,
    }
    if methods:
        values["methods"] = split_list(methods)
    guard(execute, values, "reproduce")


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="experiment TOML file (flags override it)")] = None,
    dataset: Annotated[str | None, typer.Option(help="embedded data set name")] = None,
    data: Annotated[Path | None, typer.Option(help="CSV or Parquet table, one row per subject")] = None,
    manifest: Annotated[Path | None, typer.Option(help="CSV/Parquet manifest of image files: path, label, site[, split]")] = None,
    path_column: Annotated[str | None, typer.Option(help="manifest column with each image's file or DICOM folder")] = None,
    kind: Annotated[str | None, typer.Option(help="image files: auto, nifti, dicom or image (2D)")] = None,
    skip_bad: Annotated[bool | None, typer.Option("--skip-bad/--no-skip-bad", help="skip unreadable or inconsistent image files, counted in the report")] = None,
    model: Annotated[str | None, typer.Option(help="logistic (tables), torch_logistic, mlp, cnn2d, cnn3d")] = None,
    model_option: Annotated[list[str] | None, typer.Option(help="KEY=VALUE option of the model, e.g. norm=group")] = None,
    site_column: Annotated[str | None, typer.Option(help="column naming each row's site")] = None,
    label_column: Annotated[str | None, typer.Option(help="column holding the label")] = None,
    split_column: Annotated[str | None, typer.Option(help="column with train/test per row")] = None,
    features: Annotated[str | None, typer.Option(help="comma-separated feature columns [default: all others]")] = None,
    exclude: Annotated[str | None, typer.Option(help="comma-separated table columns to leave out")] = None,
    categorical: Annotated[str | None, typer.Option(help="comma-separated string columns to one-hot encode (levels from training rows)")] = None,
    impute: Annotated[str | None, typer.Option(help="fill missing values: mean or median (training rows of each site)")] = None,
    positive_label: Annotated[str | None, typer.Option(help="label value that counts as positive")] = None,
    dataset_option: Annotated[list[str] | None, typer.Option(help="KEY=VALUE option of the embedded data set")] = None,
    methods: MethodsOpt = None,
    rounds: Annotated[int | None, typer.Option(help="communication rounds")] = None,
    local_steps: Annotated[int | None, typer.Option(help="local iterations per round")] = None,
    local_epochs: Annotated[float | None, typer.Option(help="local passes over each site's rows per round (instead of --local-steps)")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    l2: Annotated[float | None, typer.Option(help="L2 penalty (l2/2)||w||^2")] = None,
    batch_size: Annotated[int | None, typer.Option(help="mini-batch size [default: full batch]")] = None,
    mu: Annotated[float | None, typer.Option(help="FedProx proximal coefficient")] = None,
    server_lr: Annotated[float | None, typer.Option(help="server learning rate (fedavgm, fedadam, fedyogi, fedadagrad, fedsgd, scaffold)")] = None,
    byzantine: Annotated[int | None, typer.Option(help="f, the corrupted sites krum, multikrum and bulyan tolerate")] = None,
    trim_beta: Annotated[float | None, typer.Option(help="fraction trimmed_mean drops at each end")] = None,
    q: Annotated[float | None, typer.Option(help="fairness exponent of fair (q-FFL)")] = None,
    lam: Annotated[float | None, typer.Option(help="Ditto's pull of the personal model toward the global one")] = None,
    alpha: Annotated[float | None, typer.Option(help="APFL's mixing weight of the local model")] = None,
    max_update_norm: Annotated[float | None, typer.Option(help="the server rejects uploads whose update norm is larger")] = None,
    loso: Annotated[bool | None, typer.Option("--loso/--no-loso", help="also test each site as unseen: train without it")] = None,
    fraction_fit: Annotated[float | None, typer.Option(help="fraction of sites selected per round")] = None,
    min_sites: Annotated[int | None, typer.Option(help="minimum number of sites per round")] = None,
    method_option: Annotated[list[str] | None, typer.Option(help="METHOD.KEY=VALUE, e.g. fedprox.mu=0.01")] = None,
    repeats: Annotated[int | None, typer.Option(help="repeated splits")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of splits and training")] = None,
    scaling: Annotated[str | None, typer.Option(help="global, site or none")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder")] = None,
    plots: Annotated[bool | None, typer.Option("--plots/--no-plots", help="write ROC and convergence PNGs")] = None,
    eval_every: Annotated[int | None, typer.Option(help="test-set AUC of the global model every N rounds, in the history")] = None,
    workers: Annotated[int | None, typer.Option(help="repeats in parallel processes (0 = one per core)")] = None,
) -> None:
    """Run the experiment harness from a config file and/or flags."""

    def build() -> dict[str, Any]:
        from medfed.experiments.config import merge, read_toml

        base = read_toml(config) if config is not None else {}
        over: dict[str, Any] = {}
        data_over: dict[str, Any] = {}
        if dataset is not None or data is not None or manifest is not None:
            base.pop("data", None)  # a source given by flags replaces the file's source
            data_over = {"dataset": dataset, "path": str(data) if data else None,
                         "manifest": str(manifest) if manifest else None}
        for key, value in [
            ("path_column", path_column), ("kind", kind), ("skip_bad", skip_bad),
            ("site_column", site_column), ("label_column", label_column), ("split_column", split_column),
            ("features", split_list(features)), ("impute", impute), ("positive_label", positive_label),
            ("exclude", split_list(exclude)), ("categorical", split_list(categorical)),
        ]:
            if value is not None:
                data_over[key] = value
        if dataset_option:
            data_over["options"] = parse_options(dataset_option, "--dataset-option")
        if data_over:
            over["data"] = data_over
        training = {k: v for k, v in [("rounds", rounds), ("local_steps", local_steps),
                                       ("local_epochs", local_epochs), ("lr", lr),
                                       ("l2", l2), ("batch_size", batch_size), ("fraction_fit", fraction_fit),
                                       ("min_sites", min_sites), ("max_update_norm", max_update_norm)]
                    if v is not None}
        if training:
            over["training"] = training
        method_opts: dict[str, dict[str, Any]] = {}
        for name, opts in parse_method_options(method_option).items():
            method_opts.setdefault(name, {}).update(opts)
        if method_opts:
            over["method_options"] = method_opts
        if model_option:
            over["model_options"] = parse_options(model_option, "--model-option")
        for key, value in [("methods", split_list(methods)), ("repeats", repeats), ("seed", seed),
                           ("scaling", scaling), ("out", str(out) if out else None), ("plots", plots),
                           ("eval_every", eval_every), ("workers", workers), ("loso", loso), ("model", model)]:
            if value is not None:
                over[key] = value
        merged = merge(base, over)
        flags = {"mu": ("--mu", mu), "server_lr": ("--server-lr", server_lr), "f": ("--byzantine", byzantine),
                 "beta": ("--trim-beta", trim_beta), "q": ("--q", q), "lam": ("--lam", lam), "alpha": ("--alpha", alpha)}
        common = method_flag_options(merged.get("methods"), flags)
        if common:
            merged = merge(merged, {"method_options": merge(common, merged.get("method_options", {}))})
        if "data" not in merged:
            raise ConfigError(
                "no data: give --dataset NAME, --data FILE or --manifest FILE (or a [data] table in the config)"
            )
        return merged

    values = guard(build)
    guard(execute, values, str(config) if config else "flags")


@app.command("datasets")
def list_datasets() -> None:
    """List the embedded data sets."""
    from medfed.data.datasets import DATASETS

    table = Table("name", "description")
    for name, (_, _, text) in DATASETS.items():
        table.add_row(name, text)
    console.print(table)


@app.command("methods")
def list_methods() -> None:
    """List every setting and method: name, display name, what it does, reference, options."""
    from medfed.experiments.methods import METHODS

    def show(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {v:g}" for k, v in value.items()) + "} (per site)"
        return f"{value:g}" if isinstance(value, float) and not isinstance(value, bool) else str(value).lower()

    table = Table("name", "display", "uploads", "what it does", "reference", "options")
    family = None
    for m in METHODS.values():
        if m.family != family:
            if family is not None:
                table.add_section()
            table.add_row(f"[bold]{m.family}[/]", "", "", "", "", "")
            family = m.family
        opts = ", ".join(f"{k}={show(v)}" for k, v in m.defaults.items())
        name = m.name + (" *" if m.personal else "")
        table.add_row(name, m.display, m.uploads or "-", m.summary, m.reference, opts or "-")
    console.print(table)
    console.print("[dim]* also reports each site's personal model. Options: --method-option NAME.KEY=VALUE "
                  "or [method_options.NAME] in a config file.[/]", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
