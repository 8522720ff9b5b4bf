"""``medfed audit``: audits of a federation under attack. ``medfed audit robustness`` compares
defenses with and without F corrupted sites (:mod:`medfed.experiments.audit`).

"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medfed.cli import common
from medfed.cli.common import (
    CONTEXT,
    apply_threads,
    compact,
    console,
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
from medfed.cli.flags import (
    BatchSizeOpt,
    CategoricalOpt,
    ConfigArg,
    DataOpt,
    DatasetOpt,
    DatasetOptionOpt,
    ExcludeOpt,
    FeaturesOpt,
    FractionFitOpt,
    ImputeOpt,
    KindOpt,
    L2Opt,
    LabelColumnOpt,
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
    PathColumnOpt,
    PositiveLabelOpt,
    RoundsOpt,
    ScalingOpt,
    SiteColumnOpt,
    SkipBadOpt,
    SplitColumnOpt,
    study_overrides,
)
from medfed.errors import ConfigError

audit_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
    help="Audits: how defenses hold up when some sites are corrupted.",
)

# the screen table shows the headline metrics; the files carry all four
SCREEN_METRICS = ("acc", "auc")
CONDITIONS = ("clean", "attacked", "drop")


def render_audit(doc: dict[str, Any], out: Console | None = None) -> None:
    """The audit's headline table (defense | clean | attacked | drop) with numbered notes below.

    Where six ``mean ± std`` columns are wider than the terminal, each defense takes one row
    per metric with the conditions as columns, and the cells drop the spaces around ±."""
    from medfed.experiments.audit import audit_rows

    out = out or console
    attack = doc["attack"]
    params = ", ".join(f"{k}={attack[k]:g}" for k in ("scale", "sigma", "rate") if k in attack)
    title = (
        f"{doc['dataset']}: {attack['kind']}{f' ({params})' if params else ''} at {doc['corrupt']} of "
        f"{len(doc['sites'])} sites; clean sites' pooled test rows, mean ± std over {doc['repeats']} "
        f"repeat(s), seed {doc['seed']}"
    )
    rows, notes = audit_rows(doc, SCREEN_METRICS)
    labels = [row["defense"] + (f" [{', '.join(map(str, row['notes']))}]" if row["notes"] else "") for row in rows]

    def wide() -> Table:
        table = Table(title=title, title_justify="left")
        table.add_column("Defense", no_wrap=True)
        for condition in CONDITIONS:
            for m in SCREEN_METRICS:
                table.add_column(f"{condition.capitalize()} {m.upper()}", justify="right", no_wrap=True)
        for row, label in zip(rows, labels):
            table.add_row(escape(label), *(x for c in CONDITIONS for x in row["cells"][c]))
        return table

    def by_metric(cell: Callable[[str], str]) -> Callable[[], Table]:
        def build() -> Table:
            table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
            table.add_column("Defense", overflow="fold")
            table.add_column("")
            for condition in CONDITIONS:
                table.add_column(condition.capitalize(), justify="right", overflow="fold")
            for row, label in zip(rows, labels):
                for i, m in enumerate(SCREEN_METRICS):
                    table.add_row(escape(label) if i == 0 else "", m.upper(),
                                  *(cell(row["cells"][c][i]) for c in CONDITIONS))
            return table
        return build

    out.print(first_fitting([(wide, False), (by_metric(compact), True), (by_metric(stacked), True)], out))
    chosen = "; ".join(f"{i + 1}: {', '.join(s)}" for i, s in enumerate(doc["corrupted_sites"]))
    out.print(f"[dim]corrupted sites per repeat: {escape(chosen)}; drop = clean − attacked[/]", highlight=False)
    for i, note in enumerate(notes, 1):
        out.print(f"[dim][{i}] {escape(note)}[/]", highlight=False)


def execute_audit(values: dict[str, Any], attack_values: dict[str, Any], source: str = "flags") -> dict[str, Any]:
    """Validate, check the output folder, run with a progress bar, write the three files
    atomically, render; return the doc."""
    from medfed.experiments.audit import Attack, audit_files, run_robustness_audit
    from medfed.experiments.config import build_config
    from medfed.experiments.harness import load_federation
    from medfed.experiments.report import output_dir, write_atomically
    from medfed.experiments.results import environment

    config = build_config(values, source, flag_for)
    attack = Attack(**attack_values)
    out = config.out
    with output_dir(out, "--out", owns=tuple(audit_files({})), overwrite=config.overwrite):
        apply_threads(config)
        federation = load_federation(config.data)
        with progress_steps(config.repeats * len(config.methods) * 2) as step:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # single-class sites show up as undefined metrics
                doc = run_robustness_audit(config, attack, federation=federation, progress=step)
        doc.update(command=common.COMMAND, environment=environment(config))
        written = write_results(lambda: write_atomically(out, audit_files(doc)), out)

    def render() -> None:
        render_audit(doc)
        console.print(f"[dim]{doc['runtime_s']:.2f} s; wrote {', '.join(p.name for p in written)} to "
                      f"{escape(str(out))}[/]", highlight=False)

    show(render, str(out))
    return doc


@audit_app.command("robustness")
def robustness(
    attack: Annotated[str, typer.Option(help="label_flip, noisy_labels, sign_flip, scale, gaussian or free_rider")],
    out: Annotated[str, typer.Option(help="output folder for robustness.json, .csv and .md")],
    config: ConfigArg = None,
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    manifest: ManifestOpt = None,
    path_column: PathColumnOpt = None,
    kind: KindOpt = None,
    skip_bad: SkipBadOpt = None,
    site_column: SiteColumnOpt = None,
    label_column: LabelColumnOpt = None,
    split_column: SplitColumnOpt = None,
    features: FeaturesOpt = None,
    exclude: ExcludeOpt = None,
    categorical: CategoricalOpt = None,
    impute: ImputeOpt = None,
    positive_label: PositiveLabelOpt = None,
    dataset_option: DatasetOptionOpt = None,
    model: ModelOpt = None,
    model_option: ModelOptionOpt = None,
    corrupt: Annotated[int, typer.Option(help="number of corrupted sites F (chosen per repeat)")] = 1,
    defenses: Annotated[
        str | None,
        typer.Option(help="comma-separated federated methods (default: the config's methods, else fedavg and "
                          "every robust rule)"),
    ] = None,
    scale: Annotated[float | None, typer.Option(help="multiplier of sign_flip (default 1) and scale (default 10)")] = None,
    sigma: Annotated[float, typer.Option(help="std of the gaussian attack's noise")] = 1.0,
    rate: Annotated[float, typer.Option(help="probability that noisy_labels redraws a label")] = 0.3,
    repeats: Annotated[int | None, typer.Option(help="repeated splits, each with its own corrupted sites [default: 3]")] = None,
    rounds: RoundsOpt = None,
    local_steps: LocalStepsOpt = None,
    local_epochs: LocalEpochsOpt = None,
    lr: LrOpt = None,
    l2: L2Opt = None,
    batch_size: BatchSizeOpt = None,
    fraction_fit: FractionFitOpt = None,
    min_sites: MinSitesOpt = None,
    max_update_norm: MaxUpdateNormOpt = None,
    scaling: ScalingOpt = None,
    seed: Annotated[int | None, typer.Option(help="seed of splits, corrupted sites, attacks and training [default: 0]")] = None,
    method_option: MethodOptionOpt = None,
    threads: Annotated[int | None, typer.Option(min=1, help="threads torch models compute with [default: 1]")] = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Each defense's clean-site metrics with and without F corrupted sites.

    Data, model and training come from the same flags as `medfed run` (or a config file, whose
    `methods` are the defenses); `--attack`, `--corrupt` and `--out` say what to audit and where.
    """
    flag_values = dict(locals())  # every flag by its parameter name, for study_overrides

    def build() -> tuple[dict[str, Any], dict[str, Any]]:
        from medfed.experiments.audit import default_defenses
        from medfed.experiments.config import merge, read_toml

        base = read_toml(config) if config is not None else {}
        sources = {"--dataset": dataset, "--data": data, "--manifest": manifest}
        given = [flag for flag, v in sources.items() if v is not None]
        if len(given) > 1 or (not given and "data" not in base):
            raise ConfigError(
                f"give one data source: --dataset NAME, --data FILE or --manifest FILE, or a [data] table in a "
                f"config file (got {len(given)})"
            )
        over: dict[str, Any] = {"out": out, "threads": threads, "overwrite": bool(overwrite)}
        over.update(study_overrides(base, flag_values))
        if method_option:
            over["method_options"] = parse_method_options(method_option)
        if model_option:
            over["model_options"] = parse_options(model_option, "--model-option")
        for key, value in (("methods", split_list(defenses)), ("repeats", repeats), ("seed", seed),
                           ("scaling", scaling), ("model", model)):
            if value is not None:
                over[key] = value
        values = merge(base, over)
        values.setdefault("methods", default_defenses())
        values.setdefault("repeats", 3)  # an audit trains every defense twice per repeat
        return values, {"kind": attack, "corrupt": corrupt, "scale": scale, "sigma": sigma, "rate": rate}

    values, attack_values = guard(build)
    guard(execute_audit, values, attack_values, str(config) if config else "flags")
