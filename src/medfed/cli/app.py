"""The ``medfed`` command: ``reproduce``, ``run``, ``predict``, ``datasets``, ``methods``.

Errors medfed raises on purpose are printed as one line and exit with status 2; the exit
statuses (``common.EXIT_STATUSES``) say whether result files were written. The library does
all the work, this module only parses, renders and writes.
"""

from __future__ import annotations

import functools
import shlex
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from medfed.cli import common
from medfed.cli.audit import audit_app
from medfed.cli.deploy import deploy_app
from medfed.cli.common import (
    CONTEXT,
    EXIT_STATUSES,
    apply_threads,
    compact,
    console,
    err_console,
    first_fitting,
    flag_for,
    guard,
    parse_method_options,
    parse_options,
    progress_steps,
    show,
    split_list,
    stacked,
    write_results,
)
from medfed.cli.features import features_app
from medfed.cli.harmonize import harmonize_app
from medfed.cli.flags import (
    BandOpt,
    BatchSizeOpt,
    CategoricalOpt,
    ConfigArg,
    CovariatesOpt,
    LabeledFractionOpt,
    LabelColumnSiteOpt,
    LabeledFractionSiteOpt,
    UnlabeledValueOpt,
    EbOpt,
    HarmonizeOpt,
    DataOpt,
    DatasetOpt,
    DatasetOptionOpt,
    DropOpt,
    ExcludeOpt,
    ExecutorOpt,
    RayAddressOpt,
    FeaturesOpt,
    FractionFitOpt,
    ImputeOpt,
    KindOpt,
    L2Opt,
    LossOpt,
    LossOptionOpt,
    LabelColumnOpt,
    LabelColumnsOpt,
    LocalEpochsOpt,
    LocalStepsOpt,
    LrOpt,
    ManifestOpt,
    MaxUpdateNormOpt,
    MethodOptionOpt,
    MinSitesOpt,
    OverwriteOpt,
    ModelOpt,
    ModelOptionOpt,
    MaskColumnOpt,
    PathColumnOpt,
    PositiveLabelOpt,
    TaskOpt,
    ResumeOpt,
    RoundsOpt,
    SaveModelOpt,
    ScalingOpt,
    SiteColumnOpt,
    SkipBadOpt,
    SplitColumnOpt,
    ThresholdOpt,
    StrengthOpt,
    study_overrides,
    with_method_flags,
    AccountantOpt,
    AdaptiveClipOpt,
    SecureAggregationOpt,
    SecureDegreeOpt,
    SecureThresholdOpt,
    ClipOpt,
    DeltaOpt,
    DpOpt,
    NoiseOpt,
    TargetEpsilonOpt,
    CompressOpt,
)
from medfed.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
    help="medfed: federated learning for medical image analysis (Guan & Liu's survey, measured).",
    epilog=EXIT_STATUSES,
)


def _print_version(value: bool) -> None:
    if value:
        from medfed import __version__

        show(lambda: console.print(f"medfed {__version__}", highlight=False))
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="print medfed's version and exit")] = False,
) -> None:
    pass


app.add_typer(audit_app, name="audit", help="Audits under attack: `medfed audit robustness` compares defenses; `medfed audit leakage` inverts an upload.")
app.add_typer(features_app, name="features", help="Feature tables from images: `medfed features roi` extracts atlas-region means.")
app.add_typer(deploy_app, name="deploy", help="Deployment on Flower: certs, server, site, status.")
app.add_typer(harmonize_app, name="harmonize", help="Harmonize a feature table across sites: `medfed harmonize combat`.")


# The terminal shows at most this many rows of the table, the first and the last half: drawing
# 10,000 sites' rows took longer than training them (42 s of a 63 s run). The files keep every row.
SCREEN_ROWS = 120


def screen_rows(rows: list[dict[str, Any]], limit: int = SCREEN_ROWS) -> tuple[list, list, list]:
    """``rows`` as (head, hidden, tail): all in ``head`` when there are at most ``limit``."""
    if len(rows) <= limit:
        return rows, [], []
    half = limit // 2
    return rows[:half], rows[half : len(rows) - half], rows[len(rows) - half :]


def hidden_rows_line(hidden: list[dict[str, Any]], total: int, first: int) -> str:
    """What the terminal left out of the table, and where it is."""
    sites = list(dict.fromkeys(r["test_site"] for r in hidden))
    noted = sum(bool(r["notes"]) for r in hidden)
    span = sites[0] if len(sites) == 1 else f"{sites[0]} ... {sites[-1]}"
    return (f"rows {first + 1:,}-{first + len(hidden):,} of {total:,} not shown ({len(sites):,} test site(s): "
            f"{span}{f'; {noted:,} with notes' if noted else ''}): every row is in table.md, results.csv and "
            "results.json")


def render_table(doc: dict[str, Any], out: Console | None = None) -> None:
    """The Table 2 layout on the console. Where the usual layout (a Test site column, cells
    ``mean ± std``) is wider than the terminal, each test site heads its block of rows and the
    cells drop the spaces around ± (or, narrower still, put ±std under the mean): no number is
    ever cut. Past :data:`SCREEN_ROWS` rows it shows the first and last ones and says what it
    left out (every row is in the files)."""
    from medfed.experiments.results import (
        communication_lines,
        data_note_lines,
        harmonization_lines,
        privacy_lines,
        server_note_lines,
        table_rows,
        task_lines,
        threshold_lines,
    )
    from medfed.experiments.metrics import metric_label, metric_set
    from medfed.experiments.saved_model import model_lines

    out = out or console
    all_rows = table_rows(doc)
    head, hidden, tail = screen_rows(all_rows)
    rows: list[dict[str, Any] | None] = [*head, *([None] if hidden else []), *tail]  # None: the rows left out
    notes: list[str] = []
    labels = []
    for row in rows:
        if row is None:
            labels.append(None)
            continue
        label = row["label"]
        if row["notes"]:
            notes.append(f"{row['test_site']} / {label}: " + "; ".join(row["notes"]))
            label += f" [{len(notes)}]"
        labels.append(label)
    title = f"{doc['dataset']}: mean ± std over {doc['repeats']} repeat(s), seed {doc['seed']}"
    metrics = tuple(metric_label(m) for m in metric_set(doc.get("task")).screen)  # the rest: results.csv/.md/.json

    def wide() -> Table:
        table = Table(title=title, title_justify="left")
        for col in ("Test site", "Setting", *metrics):
            table.add_column(col, justify="left" if col in ("Test site", "Setting") else "right", no_wrap=True)
        previous = None
        for row, label in zip(rows, labels):
            if row is None:
                table.add_section()
                table.add_row(*["..."] * (2 + len(metrics)))
                previous = "..."
                continue
            if previous is not None and row["test_site"] != previous:
                table.add_section()
            table.add_row(row["test_site"] if row["test_site"] != previous else "", label, *row["cells"])
            previous = row["test_site"]
        return table

    def narrow(cell: Callable[[str], str]) -> Callable[[], Table]:
        def build() -> Table:
            table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
            table.add_column("Test site / setting", overflow="fold")
            for col in metrics:
                # a number is one word: wrapping can split "not computable", never a number
                table.add_column(col, justify="right", overflow="fold")
            previous = None
            for row, label in zip(rows, labels):
                if row is None:
                    table.add_section()
                    table.add_row(*["..."] * (1 + len(metrics)))
                    previous = "..."
                    continue
                if row["test_site"] != previous:
                    if previous is not None:
                        table.add_section()
                    table.add_row(Text(row["test_site"], style="bold"), *[""] * len(metrics))
                table.add_row(Text("  " + label), *(cell(c) for c in row["cells"]))
                previous = row["test_site"]
            return table
        return build

    out.print(first_fitting([(wide, False), (narrow(compact), True), (narrow(stacked), True)], out))
    if hidden:
        out.print(f"[dim]{escape(hidden_rows_line(hidden, len(all_rows), len(head)))}[/]", highlight=False)
    for i, note in enumerate(notes, 1):
        out.print(f"[dim][{i}] {escape(note)}[/]", highlight=False)
    for line in task_lines(doc) + threshold_lines(doc):
        out.print(f"[dim]{escape(line)}[/]", highlight=False)
    for line in communication_lines(doc):
        out.print(f"[dim]{escape(line)}[/]", highlight=False)
    for line in harmonization_lines(doc):
        out.print(f"harmonization: {escape(line)}", highlight=False)
    for line in data_note_lines(doc):
        out.print(f"[yellow]data:[/] {escape(line)}", highlight=False)
    for line in server_note_lines(doc):
        out.print(f"[yellow]server:[/] {escape(line)}", highlight=False)
    for line in privacy_lines(doc):
        out.print(f"privacy: {escape(line)}", highlight=False)
    for line in model_lines(doc):
        out.print(f"[dim]models: {escape(line)}[/]", highlight=False)
    for w in doc["warnings"]:
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)


def execute(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate, check the output folder, run with a progress bar, write the report
    atomically, render; return the doc."""
    from medfed.experiments.config import build_config
    from medfed.experiments.harness import discard_checkpoints, load_federation, run_experiment
    from medfed.experiments.report import output_dir, owned_files, report_files, write_atomically
    from medfed.experiments.results import results_document

    config = build_config(values, source, flag_for)
    if config.out is None:
        raise ConfigError("no output folder: give --out DIR (or out = \"DIR\" in the config file)")
    if config.executor == "flower":
        return execute_on_flower(config)
    with output_dir(config.out, "--out", owns=owned_files(config.save_model), overwrite=config.overwrite):
        apply_threads(config)
        federation = load_federation(config.data)
        total = config.repeats * len(config.methods)
        with progress_steps(total) as step:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # single-class notes are rendered with the table
                run = run_experiment(config, federation, progress=step)
        doc = results_document(run, command=common.COMMAND)
        written = write_results(
            lambda: write_atomically(config.out, report_files(doc, run, plots=config.plots)), config.out
        )
        discard_checkpoints(config)  # the results are written: nothing is left to resume

    def render() -> None:
        render_table(doc)
        names = (p.relative_to(config.out).as_posix() for p in written)
        console.print(f"[dim]{run.runtime_s:.2f} s; wrote {', '.join(names)} to "
                      f"{escape(str(config.out))}[/]", highlight=False)

    show(render, str(config.out))
    return doc


def execute_on_flower(config) -> dict[str, Any]:
    """``--executor flower``: the study on a Flower deployment on this machine (every site a
    SuperNode on 127.0.0.1); the coordinator writes the report, this renders it."""
    import time

    from medfed.deploy.local import check_local_flower, run_on_local_flower
    from medfed.deploy.study import check_settings
    from medfed.experiments.harness import load_federation
    from medfed.experiments.report import output_dir, owned_files

    check_local_flower(config)
    check_settings(config, "--executor flower", manifest=config.data.manifest is not None)
    started = time.perf_counter()
    with output_dir(config.out, "--out", owns=owned_files(True), overwrite=config.overwrite):
        federation = load_federation(config.data)
        doc = run_on_local_flower(config, federation, command=common.COMMAND,
                                  log=lambda line: console.print(f"[dim]{escape(line)}[/]", highlight=False))

    def render() -> None:
        render_table(doc)
        console.print(f"[dim]{time.perf_counter() - started:.2f} s on Flower; wrote results.json, results.csv, "
                      f"table.md, models/ to {escape(str(config.out))}[/]", highlight=False)

    show(render, str(config.out))
    return doc


def method_flag_options(names: list[str] | None, flags: dict[str, tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    """Options given as common flags (``--mu``, ``--server-lr``, ...), for every selected method
    that declares the option as a flag; a flag no selected method takes is an error."""
    from medfed.experiments.config import DEFAULT_METHODS
    from medfed.methods.registry import METHOD_FLAGS, METHODS

    selected = [METHODS[n.strip().lower()] for n in (names or DEFAULT_METHODS) if n.strip().lower() in METHODS]
    out: dict[str, dict[str, Any]] = {}
    for option, (flag, value) in flags.items():
        if value is None:
            continue
        takers = [m.name for m in selected if option in m.flags]
        if not takers:
            allowed = METHOD_FLAGS[option].methods
            run = ", ".join(m.name for m in selected)
            raise ConfigError(
                f"{flag} sets an option of {', '.join(allowed)}, not among the methods run ({run}); "
                f"add one to --methods or drop {flag}"
            )
        for name in takers:
            out.setdefault(name, {})[option] = value
    return out


ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="threads torch models compute with [default: 1]; the same count gives "
                                          "the same numbers (recorded in results.json)"),
]


MethodsOpt = Annotated[
    str | None, typer.Option("--methods", help="comma-separated method names (see `medfed methods`)")
]
PlotFormatOpt = Annotated[
    str | None, typer.Option("--plot-format", help="plot file formats, e.g. png,pdf,svg (implies --plots)")
]


@app.command()
def reproduce(
    dataset: Annotated[str, typer.Option(help="embedded data set (see `medfed datasets`)")] = "adni-like",
    repeats: Annotated[int, typer.Option(help="repeated stratified 80/20 splits")] = 5,
    seed: Annotated[int, typer.Option(help="seed of splits and training")] = 0,
    out: Annotated[str | None, typer.Option(help="output folder [default: results/<dataset>]")] = None,
    plots: Annotated[bool, typer.Option("--plots", help="also write the task's plots (ROC, confusion matrix, predicted vs true, segmentation overlays) and convergence (PNG unless --plot-format)")] = False,
    methods: MethodsOpt = None,
    loso: Annotated[bool, typer.Option("--loso", help="also test each site as unseen: train without it")] = False,
    plot_format: PlotFormatOpt = None,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = None,
    save_model: SaveModelOpt = None,
) -> None:
    """Reproduce the survey's Table 2 (Cross, Single, Mix, FedAvg, FedSGD, FedProx) on embedded data."""
    values: dict[str, Any] = {
        "data": {"dataset": dataset},
        "repeats": repeats,
        "seed": seed,
        "out": str(Path("results") / dataset) if out is None else out,
        "overwrite": bool(overwrite),
        "plots": plots or plot_format is not None,
        "loso": loso,
        "threads": threads,
        "save_model": bool(save_model),
    }
    if methods:
        values["methods"] = split_list(methods)
    if plot_format is not None:
        values["plot_formats"] = split_list(plot_format)
    guard(execute, values, "reproduce")


@app.command()
@with_method_flags(after="batch_size")
def run(
    config: ConfigArg = None,
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    manifest: ManifestOpt = None,
    path_column: PathColumnOpt = None,
    mask_column: MaskColumnOpt = None,
    kind: KindOpt = None,
    skip_bad: SkipBadOpt = None,
    model: ModelOpt = None,
    model_option: ModelOptionOpt = None,
    site_column: SiteColumnOpt = None,
    label_column: LabelColumnOpt = None,
    label_columns: LabelColumnsOpt = None,
    label_column_site: LabelColumnSiteOpt = None,
    split_column: SplitColumnOpt = None,
    features: FeaturesOpt = None,
    exclude: ExcludeOpt = None,
    categorical: CategoricalOpt = None,
    impute: ImputeOpt = None,
    positive_label: PositiveLabelOpt = None,
    task: TaskOpt = None,
    unlabeled_value: UnlabeledValueOpt = None,
    labeled_fraction: LabeledFractionOpt = None,
    labeled_fraction_site: LabeledFractionSiteOpt = None,
    dataset_option: DatasetOptionOpt = None,
    covariates: CovariatesOpt = None,
    harmonize: HarmonizeOpt = None,
    eb: EbOpt = None,
    band: BandOpt = None,
    strength: StrengthOpt = None,
    methods: MethodsOpt = None,
    rounds: RoundsOpt = None,
    local_steps: LocalStepsOpt = None,
    local_epochs: LocalEpochsOpt = None,
    lr: LrOpt = None,
    l2: L2Opt = None,
    loss: LossOpt = None,
    loss_option: LossOptionOpt = None,
    batch_size: BatchSizeOpt = None,
    max_update_norm: MaxUpdateNormOpt = None,
    loso: Annotated[bool | None, typer.Option("--loso/--no-loso", help="also test each site as unseen: train without it")] = None,
    fraction_fit: FractionFitOpt = None,
    min_sites: MinSitesOpt = None,
    method_option: MethodOptionOpt = None,
    repeats: Annotated[int | None, typer.Option(help="repeated splits")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of splits and training")] = None,
    scaling: ScalingOpt = None,
    threshold: ThresholdOpt = None,
    out: Annotated[str | None, typer.Option(help="output folder")] = None,
    plots: Annotated[bool | None, typer.Option("--plots/--no-plots", help="write the task's plots (ROC, confusion matrix, predicted vs true, segmentation overlays), convergence and --eval-every test metrics")] = None,
    plot_format: PlotFormatOpt = None,
    eval_every: Annotated[int | None, typer.Option(help="test-set ACC, SEN, SPE, AUC of the global model every N rounds, in the history")] = None,
    workers: Annotated[int | None, typer.Option(help="repeats in parallel processes (0 = one per core)")] = None,
    threads: ThreadsOpt = None,
    overwrite: OverwriteOpt = None,
    executor: ExecutorOpt = None,
    ray_address: RayAddressOpt = None,
    resume: ResumeOpt = None,
    drop: DropOpt = None,
    dp: DpOpt = None,
    clip: ClipOpt = None,
    noise: NoiseOpt = None,
    delta: DeltaOpt = None,
    target_epsilon: TargetEpsilonOpt = None,
    accountant: AccountantOpt = None,
    adaptive_clip: AdaptiveClipOpt = None,
    secure_aggregation: SecureAggregationOpt = None,
    secure_threshold: SecureThresholdOpt = None,
    secure_degree: SecureDegreeOpt = None,
    compress: CompressOpt = None,
    method_flags: dict[str, tuple[str, Any]] | None = None,
    save_model: SaveModelOpt = None,
) -> None:
    """Run the experiment harness from a config file and/or flags."""
    flag_values = dict(locals())  # every flag by its parameter name, for study_overrides

    def build() -> dict[str, Any]:
        from medfed.experiments.config import merge, read_toml

        base = read_toml(config) if config is not None else {}
        over = study_overrides(base, flag_values)
        method_opts: dict[str, dict[str, Any]] = {}
        for name, opts in parse_method_options(method_option).items():
            method_opts.setdefault(name, {}).update(opts)
        if method_opts:
            over["method_options"] = method_opts
        if model_option:
            over["model_options"] = parse_options(model_option, "--model-option")
        for key, value in [("methods", split_list(methods)), ("repeats", repeats), ("seed", seed),
                           ("scaling", scaling), ("out", out), ("overwrite", overwrite), ("plots", plots),
                           ("eval_every", eval_every),
                           ("workers", workers), ("threads", threads), ("loso", loso), ("model", model),
                           ("save_model", save_model),
                           ("plot_formats", split_list(plot_format)), ("executor", executor), ("ray_address", ray_address),
                           ("resume", resume), ("drop", drop or None), ("compress", compress)]:
            if value is not None:
                over[key] = value
        if plot_format is not None and plots is None:
            over["plots"] = True
        merged = merge(base, over)
        from_flags = method_flag_options(merged.get("methods"), method_flags or {})
        if from_flags:
            merged = merge(merged, {"method_options": merge(from_flags, merged.get("method_options", {}))})
        if "data" not in merged:
            raise ConfigError(
                "no data: give --dataset NAME, --data FILE or --manifest FILE (or a [data] table in the config)"
            )
        return merged

    values = guard(build)
    guard(execute, values, str(config) if config else "flags")


def execute_predict(model: Path, data: Path | None, out: Path, site: str | None, label_column: str | None,
                    id_column: str | None, manifest: Path | None = None, path_column: str | None = None,
                    mask_column: str | None = None, kind: str | None = None) -> None:
    """Check the output name, load and check the model, read and score the rows (a table with
    ``data``, images with ``manifest``), write the predictions atomically, summarize."""
    import os

    from medfed.data.tables import read_scoring_rows
    from medfed.experiments.report import output_dir, write_atomically
    from medfed.experiments.saved_model import load_saved_model, predictions_csv

    if (data is None) == (manifest is None):
        raise ConfigError("give the rows to score: --data FILE (a table) or --manifest FILE (images), one of them")
    if manifest is None:
        for flag, value in (("--path-column", path_column), ("--mask-column", mask_column), ("--kind", kind)):
            if value is not None:
                raise ConfigError(f"{flag} applies to a manifest of image files (--manifest FILE), not to --data")
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out must end in .csv, got {out.name!r}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name ending in .csv")
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {out} is a symbolic link to {os.readlink(out)!r}, which does not exist")
    for given, name in ((model, "--model"), (data, "--data"), (manifest, "--manifest")):
        if given is not None and out.resolve() == given.resolve():
            raise ConfigError(f"--out {out} is the {name} file; give the predictions another name")
    saved = load_saved_model(model)
    saved.check_scorable(site, str(model), images=manifest is not None)
    if manifest is not None:
        if label_column is not None or id_column is not None:
            flag = "--label-column" if label_column is not None else "--id-column"
            raise ConfigError(f"{flag} applies to a table (--data); a manifest's rows are named by their path "
                              + ("and compared with true masks through --mask-column" if saved.task == "segmentation"
                                 else "(labels of images are not compared yet)"))
        return _predict_images(saved, model, manifest, out, site, path_column or "path", mask_column, kind or "auto")
    label = saved.meta["label"]
    if saved.task != "binary":  # its label column is not read: scores are compared with labels for binary models
        if label_column is not None:
            raise ConfigError(f"--label-column: medfed predict compares a binary model's scores with labels so far; "
                              f"{model} holds a {saved.task} model: leave --label-column out")
        label = {**label, "column": None}
    # the predictions go next to the user's other files: they replace one file, not a run's set
    with output_dir(out.parent, "--out's folder"):
        rows = read_scoring_rows(
            data, feature_names=saved.meta["feature_names"], categorical=saved.categorical,
            impute=saved.meta.get("impute"), model=str(model), label_column=label_column or label["column"],
            positive_label=label["positive_label"], require_label=label_column is not None, id_column=id_column,
        )
        scored = saved.score(rows, site, str(model), str(data))
        written = write_results(lambda: write_atomically(
            out.parent, {out.name: lambda: predictions_csv(scored, saved, rows.ids, id_column)}, as_set=False,
        ), out.parent)
    show(lambda: render_predictions(saved, scored, rows, data, site, label_column or label["column"], written[0]),
         str(out))


def _predict_images(saved, model: Path, manifest: Path, out: Path, site: str | None, path_column: str,
                    mask_column: str | None, kind: str) -> None:
    """Score a manifest's images; a segmentation model's masks go to ``<out stem>_masks/`` next to the CSV,
    written with it as one set (all or none)."""
    from medfed.data.images.load import read_image_rows
    from medfed.experiments.report import output_dir, write_atomically
    from medfed.experiments.saved_model import image_predictions_csv, mask_classes, mask_file_names, mask_values

    if mask_column is not None and saved.task != "segmentation":
        raise ConfigError(f"--mask-column: {model} holds a {saved.task} model; masks are compared with a "
                          "segmentation model's predictions only: leave --mask-column out")
    with output_dir(out.parent, "--out's folder"):
        images = read_image_rows(manifest, sample_shape=tuple(saved.meta["sample_shape"]), path_column=path_column,
                                 mask_column=mask_column, kind=kind, model=str(model))
        scored = saved.score_images(images.X, site, str(model))
        files = {}
        names = truth = None
        if saved.task == "segmentation":
            from medfed.data.images.masks import mask_bytes, mask_suffix

            truth = None if images.masks is None else mask_classes(saved, images.masks, images.paths, str(model))
            names = mask_file_names(images.paths, f"{out.stem}_masks", mask_suffix(images.kind))
            stored = mask_values(saved)[scored.predicted]  # class indices -> the values training masks held
            for i, name in enumerate(names):
                files[name] = functools.partial(mask_bytes, stored[i], images.kind, images.paths[i], images.metas[i])
        files = {out.name: lambda: image_predictions_csv(scored, saved, images.paths, names, truth), **files}
        written = write_results(lambda: write_atomically(out.parent, files, as_set=False), out.parent)
    show(lambda: render_image_predictions(saved, scored, images, truth, site, written[0], names), str(out))


def render_image_predictions(saved, scored, images, truth, site: str | None, out: Path, masks) -> None:
    """What was scored with which model; per task what came out; a segmentation model's mask files
    and, with true masks, the mean Dice and IoU over the images."""
    import numpy as np

    from medfed.experiments.saved_model import image_prediction_columns

    meta = saved.meta
    n = len(images.paths)
    print_line = functools.partial(console.print, highlight=False, soft_wrap=True)
    print_line(f"model: {meta['setting']} ({meta['model']['name']}, {saved.task}) trained on "
               f"{', '.join(meta['train_sites'])}; repeat {meta['repeat']} of {meta['repeats']}, seed {meta['seed']}")
    print_line(f"scored {n} image(s) of {escape(str(images.source))}"
               + (f" (standardized with site {site}'s statistics)" if meta["scaling"] == "site" else ""))
    if saved.task == "segmentation":
        from medfed.experiments.metrics import segmentation_metrics

        counts = np.bincount(scored.predicted.ravel(), minlength=len(saved.classes))
        print_line("voxels predicted per class: " + ", ".join(
            f"{escape(c)} {int(k)}" for c, k in zip(saved.classes, counts)))
        print_line(f"masks: {n} file(s) in {escape(str(out.parent / Path(masks[0]).parent))}")
        if truth is not None:
            metrics = segmentation_metrics(truth, scored.scores, saved.classes)
            print_line("against the manifest's masks (mean over images): " + "  ".join(
                f"{m} " + ("n/a" if metrics[m].value is None else f"{metrics[m].value:.3f}") for m in ("dice", "iou")))
    elif saved.task == "binary":
        threshold = saved.threshold(site)
        print_line(f"predicted positive ({meta['label']['positive_class']}, score >= {threshold.probability:.4g}): "
                   f"{int(scored.predicted.sum())} of {n}")
    else:
        _render_task_predictions(saved, scored, print_line)
    columns = ", ".join(image_prediction_columns(saved, truth is not None))
    print_line(f"[dim]wrote {escape(str(out))}: row, path, {escape(columns)}[/]")


def render_predictions(saved, scored, rows, data: Path, site: str | None, label_column: str | None, out: Path) -> None:
    """What was scored with which model, how many rows came out positive (binary; per class for
    multiclass), and with labels the survey's four metrics."""
    from medfed.experiments.saved_model import prediction_columns

    meta = saved.meta
    n = len(scored.scores)
    print_line = functools.partial(console.print, highlight=False, soft_wrap=True)
    print_line(f"model: {meta['setting']} ({meta['model']['name']}) trained on {', '.join(meta['train_sites'])}; "
               f"repeat {meta['repeat']} of {meta['repeats']}, seed {meta['seed']}")
    how = []
    if scored.imputed:
        how.append(f"{scored.imputed} missing value(s) filled with site {site}'s training {meta['impute']}s")
    if meta["scaling"] == "site":
        how.append(f"standardized with site {site}'s statistics")
    print_line(f"scored {n} row(s) of {data}" + (f" ({'; '.join(how)})" if how else ""))
    if saved.task != "binary":
        _render_task_predictions(saved, scored, print_line)
    else:
        _render_binary_predictions(saved, scored, rows, site, label_column, print_line)
    for column, levels in scored.unseen_levels.items():
        shown = ", ".join(f"{level!r} ({k} row(s))" for level, k in levels.items())
        print_line(f"[yellow]note:[/] column {escape(repr(column))}: level(s) no training site held, encoded as "
                   f"all-zero indicators: {escape(shown)}")
    columns = ", ".join(prediction_columns(saved.task, saved.classes))
    print_line(f"[dim]wrote {escape(str(out))}: row, {'id, ' if rows.ids is not None else ''}{escape(columns)}[/]")


def _render_task_predictions(saved, scored, print_line) -> None:
    """A multiclass model's rows per predicted class; a multilabel model's rows at or above 0.5 per
    label; a regression model's range of predicted values."""
    import numpy as np

    if saved.task == "multiclass":
        counts = np.bincount(scored.predicted, minlength=len(saved.classes))
        print_line("predicted class (the most probable): " + ", ".join(
            f"{escape(c)} {int(k)}" for c, k in zip(saved.classes, counts)))
    elif saved.task == "multilabel":
        counts = (scored.scores >= 0.5).sum(axis=0)
        print_line("rows with label probability >= 0.5: " + ", ".join(
            f"{escape(c)} {int(k)}" for c, k in zip(saved.classes, counts)))
    else:
        v = scored.scores
        print_line(f"predicted values: mean {v.mean():.4g}, min {v.min():.4g}, max {v.max():.4g} (the target's own scale)")


def _render_binary_predictions(saved, scored, rows, site, label_column, print_line) -> None:
    """How many rows came out positive at the model's threshold and, with labels, ACC/SEN/SPE/AUC."""
    from medfed.experiments.metrics import BINARY, metric_label, predicted_metrics

    meta = saved.meta
    n = scored.scores.size
    positive = int(scored.predicted.sum())
    threshold = saved.threshold(site)
    cut = f"score >= {threshold.probability:.4g}" + ("" if threshold.rule == "0.5" else f", the run's {threshold.rule} threshold")
    print_line(f"predicted positive ({meta['label']['positive_class']}, {cut}): {positive} of {n}")
    if rows.y is not None:
        metrics = predicted_metrics(rows.y, scored.predicted, scored.scores)
        cells = [f"{metric_label(m)} " + ("n/a" if metrics[m].value is None else f"{metrics[m].value:.3f}")
                 for m in BINARY.keys]
        print_line(f"against label column {label_column!r}: " + "  ".join(cells))
        for m in BINARY.keys:
            if metrics[m].value is None:
                print_line(f"[dim]{metric_label(m)}: {escape(metrics[m].reason)}[/]")


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="model file from `medfed run --save-model` (OUT/models/<Setting>.npz)")],
    out: Annotated[Path, typer.Option(help="predictions .csv: row, score (probability of the positive class), predicted; "
                                                 "score:<class> per class or label, predicted (class or value); for "
                                                 "images row, path first; a segmentation model's masks go to "
                                                 "<out stem>_masks/ next to it")],
    data: Annotated[Path | None, typer.Option(help="CSV or Parquet table with the model's feature columns")] = None,
    manifest: Annotated[Path | None, typer.Option(help="CSV/Parquet manifest of image files (an image model): a path "
                                                       "column [, a mask column]")] = None,
    path_column: Annotated[str | None, typer.Option(help="manifest column with each image's file or DICOM folder "
                                                         "[default: path]")] = None,
    mask_column: Annotated[str | None, typer.Option(help="manifest column with each image's true mask: per-image "
                                                         "Dice, IoU and HD95 of a segmentation model")] = None,
    kind: KindOpt = None,
    site: Annotated[str | None, typer.Option(help="training site whose imputation (and --scaling site statistics) "
                                                  "the rows get; needed for missing values or per-site scaling")] = None,
    label_column: Annotated[str | None, typer.Option(help="column with the true labels [default: the model's label "
                                                          "column, when the table has it]")] = None,
    id_column: Annotated[str | None, typer.Option(help="column copied into the predictions to identify each row")] = None,
) -> None:
    """Score a table (--data) or images (--manifest) with a saved model: each row's probability of the positive
    class (of each class or label; the predicted value for regression; a segmentation model's mask files), and
    for a binary model with labels ACC/SEN/SPE/AUC, for a segmentation model with true masks Dice/IoU/HD95."""
    guard(execute_predict, model, data, out, site, label_column, id_column, manifest, path_column, mask_column, kind)


@app.command("datasets")
def list_datasets() -> None:
    """List the embedded data sets."""
    from medfed.data.datasets import DATASETS

    table = Table("name", "description")
    for name, (_, _, text) in DATASETS.items():
        table.add_row(name, Text(text))
    show(lambda: console.print(table))


# below this width the six-column list is too cramped to read; each method becomes a block
METHODS_WIDE = 120


def render_methods(out: Console | None = None) -> None:
    """Every setting and method: name, display name, uploads, what it does, reference, and each
    option with its default, what it takes and its flag, from the method's option schema."""
    from medfed.methods.registry import METHODS

    out = out or console

    def fmt(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {v:g}" for k, v in value.items()) + "}"
        return f"{value:g}" if isinstance(value, float) and not isinstance(value, bool) else str(value).lower()

    def options(m) -> str:
        return "\n".join(
            f"{o.name}={fmt(o.default)} ({o.allowed()}{'; ' + o.flag if o.flag else ''})" for o in m.options
        ) or "-"

    wide = out.width >= METHODS_WIDE
    if wide:
        table = Table("name", "display", "uploads", "what it does", "reference", "options")
    else:
        table = Table("method", "what it does · reference · options", box=box.SIMPLE_HEAD, show_edge=False,
                      pad_edge=False)
    for column in table.columns:
        column.overflow = "fold"  # a long word breaks onto the next line, never into "…"
    family = None
    for m in METHODS.values():
        if m.family != family:
            if family is not None:
                table.add_section()
            table.add_row(Text(m.family, style="bold"), *[""] * (len(table.columns) - 1))
            family = m.family
        opts = options(m)
        name = m.name + (" *" if m.personal else "")
        if wide:
            table.add_row(name, m.display, m.uploads or "-", Text(m.summary), Text(m.reference), Text(opts))
        else:
            about = Text(m.summary)
            about.append(f"\n{m.reference} · uploads {m.uploads or '-'}", style="dim")
            about.append(f"\n{opts}" if m.options else " · no options", style="dim")
            table.add_row(Text(f"{name}\n{m.display}"), about)
    out.print(table)
    out.print("[dim]* also reports each site's personal model. Options: --method-option NAME.KEY=VALUE "
              f"or {escape('[method_options.NAME]')} in a config file.[/]", highlight=False)


@app.command("methods")
def list_methods() -> None:
    """List every setting and method: name, display name, what it does, reference, options."""
    show(render_methods)


def _terminate(signum: int, frame: Any) -> None:
    # SIGTERM (kill, a scheduler's time limit) unwinds like Ctrl-C: temporary files and an
    # output folder this run created are removed on the way out
    raise SystemExit(128 + signum)


def main() -> None:
    common.COMMAND = shlex.join(["medfed", *sys.argv[1:]])
    signal.signal(signal.SIGTERM, _terminate)
    app()


if __name__ == "__main__":
    sys.exit(main())
