"""``medfed audit``: audits of a federation under attack. ``medfed audit robustness`` compares
defenses with and without F corrupted sites (:mod:`medfed.experiments.audit`); ``medfed audit
membership`` attacks the trained models and ``medfed audit privacy`` sets utility against
epsilon, both over a list of DP noise multipliers (:mod:`medfed.experiments.leakage`).
"""

from __future__ import annotations

import inspect
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
    LossOpt,
    LossOptionOpt,
    LabelColumnOpt,
    LabelColumnSiteOpt,
    LabelColumnsOpt,
    LocalEpochsOpt,
    LocalStepsOpt,
    LrOpt,
    ManifestOpt,
    MaskColumnOpt,
    MaxUpdateNormOpt,
    MethodOptionOpt,
    MinSitesOpt,
    ModelOpt,
    ModelOptionOpt,
    OverwriteOpt,
    PathColumnOpt,
    PositiveLabelOpt,
    RoundsOpt,
    ScalingOpt,
    SiteColumnOpt,
    SkipBadOpt,
    SplitColumnOpt,
    TaskOpt,
    ThresholdOpt,
    study_overrides,
)
from medfed.errors import ConfigError

audit_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
    help="Audits: how defenses hold up when some sites are corrupted; what a membership attack learns; utility against epsilon; what gradient inversion rebuilds from an upload.",
)

CONDITIONS = ("clean", "attacked", "drop")


def render_audit(doc: dict[str, Any], out: Console | None = None) -> None:
    """The audit's headline table (defense | clean | attacked | drop) with numbered notes below.

    Where six ``mean ± std`` columns are wider than the terminal, each defense takes one row
    per metric with the conditions as columns, and the cells drop the spaces around ±."""
    from medfed.experiments.audit import SCREEN_METRICS, audit_rows
    from medfed.experiments.metrics import metric_label

    out = out or console
    attack = doc["attack"]
    params = ", ".join(f"{k}={attack[k]:g}" for k in ("scale", "sigma", "rate") if k in attack)
    title = (
        f"{doc['dataset']}: {attack['kind']}{f' ({params})' if params else ''} at {doc['corrupt']} of "
        f"{len(doc['sites'])} sites; clean sites' pooled test rows, mean ± std over {doc['repeats']} "
        f"repeat(s), seed {doc['seed']}"
    )
    # the task's two headline metrics on screen; the files carry every one
    screen = tuple(doc.get("screen", SCREEN_METRICS["binary"]))
    rows, notes = audit_rows(doc, screen)
    labels = [row["defense"] + (f" [{', '.join(map(str, row['notes']))}]" if row["notes"] else "") for row in rows]

    def wide() -> Table:
        table = Table(title=title, title_justify="left")
        table.add_column("Defense", no_wrap=True)
        for condition in CONDITIONS:
            for m in screen:
                table.add_column(f"{condition.capitalize()} {metric_label(m)}", justify="right", no_wrap=True)
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
                for i, m in enumerate(screen):
                    table.add_row(escape(label) if i == 0 else "", metric_label(m),
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
    label_columns: LabelColumnsOpt = None,
    label_column_site: LabelColumnSiteOpt = None,
    mask_column: MaskColumnOpt = None,
    task: TaskOpt = None,
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
    loss: LossOpt = None,
    loss_option: LossOptionOpt = None,
    batch_size: BatchSizeOpt = None,
    fraction_fit: FractionFitOpt = None,
    min_sites: MinSitesOpt = None,
    max_update_norm: MaxUpdateNormOpt = None,
    scaling: ScalingOpt = None,
    threshold: ThresholdOpt = None,
    seed: Annotated[int | None, typer.Option(help="seed of splits, corrupted sites, attacks and training [default: 0]")] = None,
    method_option: MethodOptionOpt = None,
    threads: Annotated[int | None, typer.Option(min=1, help="threads torch models compute with [default: 1]")] = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Each defense's clean-site metrics with and without F corrupted sites.

    Data, model and training come from the same flags as `medfed run` (or a config file, whose
    `methods` are the defenses); `--attack`, `--corrupt` and `--out` say what to audit and where.
    `--loss gce|sce` trains every site with a noise-robust loss (against `noisy_labels`; measured in
    medfed.models.losses).
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


# --------------------------------------------------------------------------- privacy audits


def render_privacy_audit(doc: dict[str, Any], out: Console | None = None) -> None:
    """The membership or privacy table, one row per method, model, noise and site."""
    from medfed.experiments.leakage import table_cells

    out = out or console
    header, rows = table_cells(doc)
    title = (f"{doc['dataset']}: {doc['audit']} audit, clip {doc['clip']}, delta {doc['delta']:g}; "
             f"mean ± std over {doc['repeats']} repeat(s), seed {doc['seed']}")

    def build(cell: Callable[[str], str]) -> Callable[[], Table]:
        def table() -> Table:
            t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
            for i, h in enumerate(header):
                t.add_column(h, justify="right" if i >= 2 else "left", overflow="fold")
            for row in rows:
                t.add_row(*(escape(cell(c)) for c in row))
            return t
        return table

    out.print(first_fitting([(build(str), False), (build(compact), True), (build(stacked), True)], out))
    for note in doc["notes"]:
        out.print(f"[dim]{escape(note)}[/]", highlight=False)


def _privacy_flags(
    out: Annotated[str, typer.Option(help="output folder for the audit's json, csv and md (and png)")],
    noise: Annotated[str, typer.Option(help="comma-separated DP noise multipliers; 0 = no DP [default: 0,1]")] = "0,1",
    clip: Annotated[float | None, typer.Option(help="DP: the L2 bound C of each site's update (needed for noise > 0)")] = None,
    delta: Annotated[float | None, typer.Option(help="DP: delta of the (epsilon, delta) guarantee [default: 1e-5]")] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated federated methods [default: fedavg]")] = None,
    config: ConfigArg = None,
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    manifest: ManifestOpt = None,
    path_column: PathColumnOpt = None,
    kind: KindOpt = None,
    skip_bad: SkipBadOpt = None,
    site_column: SiteColumnOpt = None,
    label_column: LabelColumnOpt = None,
    label_columns: LabelColumnsOpt = None,
    label_column_site: LabelColumnSiteOpt = None,
    mask_column: MaskColumnOpt = None,
    task: TaskOpt = None,
    split_column: SplitColumnOpt = None,
    features: FeaturesOpt = None,
    exclude: ExcludeOpt = None,
    categorical: CategoricalOpt = None,
    impute: ImputeOpt = None,
    positive_label: PositiveLabelOpt = None,
    dataset_option: DatasetOptionOpt = None,
    model: ModelOpt = None,
    model_option: ModelOptionOpt = None,
    repeats: Annotated[int | None, typer.Option(help="repeated splits [default: 3]")] = None,
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
    seed: Annotated[int | None, typer.Option(help="seed of splits, training and DP noise [default: 0]")] = None,
    method_option: MethodOptionOpt = None,
    threads: Annotated[int | None, typer.Option(min=1, help="threads torch models compute with [default: 1]")] = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """The flags `medfed audit membership` and `medfed audit privacy` share (their signature)."""


FailIfMembershipOpt = Annotated[
    float | None,
    typer.Option(help="after writing the report, exit with status 5 naming the worst (site, method, noise) when a "
                      "mean attack AUC is above this"),
]


def _privacy_values(flags: dict[str, Any]) -> tuple[dict[str, Any], list[float], float | None]:
    """The study config, the noise list and the clip the flags (and a config file) give."""
    from medfed.experiments.config import merge, read_toml

    base = read_toml(flags["config"]) if flags["config"] is not None else {}
    given = [f for f, k in (("--dataset", "dataset"), ("--data", "data"), ("--manifest", "manifest"))
             if flags[k] is not None]
    if len(given) > 1 or (not given and "data" not in base):
        raise ConfigError(
            f"give one data source: --dataset NAME, --data FILE or --manifest FILE, or a [data] table in a "
            f"config file (got {len(given)})"
        )
    base.pop("privacy", None)  # the audit sets DP itself, from --noise, --clip and --delta
    # --noise is a list here, not `medfed run`'s one multiplier: study_overrides must not see it
    study = {k: v for k, v in flags.items() if k not in ("noise", "clip", "delta")}
    over: dict[str, Any] = {"out": flags["out"], "threads": flags["threads"], "overwrite": bool(flags["overwrite"])}
    over.update(study_overrides(base, study))
    if flags["delta"] is not None:
        over["privacy"] = {"delta": flags["delta"]}
    if flags["method_option"]:
        over["method_options"] = parse_method_options(flags["method_option"])
    if flags["model_option"]:
        over["model_options"] = parse_options(flags["model_option"], "--model-option")
    for key in ("repeats", "seed", "scaling", "model"):
        if flags[key] is not None:
            over[key] = flags[key]
    if flags["methods"] is not None:
        over["methods"] = split_list(flags["methods"])
    values = merge(base, over)
    values.setdefault("methods", ["fedavg"])
    values.setdefault("repeats", 3)
    noises = []
    for item in split_list(flags["noise"]) or []:
        try:
            noises.append(float(item))
        except ValueError:
            raise ConfigError(f"--noise takes comma-separated numbers >= 0 (0: no DP), got {item!r}") from None
    return values, noises, flags["clip"]


def execute_privacy_audit(audit: str, flags: dict[str, Any]) -> dict[str, Any]:
    """Validate, check the output folder, train with a progress bar, write the files atomically,
    render; with ``--fail-if-membership-auc-above Y`` exit 5 after writing when the worst mean
    attack AUC is above Y."""
    from medfed.experiments.config import build_config
    from medfed.experiments.harness import load_federation
    from medfed.experiments.leakage import (
        audit_files,
        parse_noises,
        run_privacy_audit,
        worst_membership,
    )
    from medfed.experiments.report import output_dir, write_atomically
    from medfed.experiments.results import environment

    values, noises, clip = _privacy_values(flags)
    noises = parse_noises(noises)
    threshold = flags.get("fail_if_membership_auc_above")
    config = build_config(values, str(flags["config"]) if flags["config"] else "flags", flag_for)
    out = config.out
    with output_dir(out, "--out", owns=tuple(audit_files({"audit": audit})), overwrite=config.overwrite):
        apply_threads(config)
        federation = load_federation(config.data)
        with progress_steps(config.repeats * len(config.methods) * len(noises)) as step, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # single-class sites show up as undefined metrics
            doc = run_privacy_audit(config, audit, noises, clip, federation=federation, progress=step)
        doc.update(command=common.COMMAND, environment=environment(config))
        written = write_results(lambda: write_atomically(out, audit_files(doc)), out)

    def render() -> None:
        render_privacy_audit(doc)
        console.print(f"[dim]{doc['runtime_s']:.2f} s; wrote {', '.join(p.name for p in written)} to "
                      f"{escape(str(out))}[/]", highlight=False)

    show(render, str(out))
    worst = worst_membership(doc)
    if threshold is not None and worst is not None and worst["attack_auc"]["mean"] > threshold:
        common.fail(
            f"membership attack AUC {worst['attack_auc']['mean']:.3f} > {threshold:g} at site {worst['site']!r}, "
            f"{worst['display']} ({worst['model']} model), noise {worst['noise']:g}; the report is in {out}",
            common.EXIT_AUDIT_FAILED,
        )
    return doc


def _privacy_command(audit: str, extra: list[inspect.Parameter], doc: str) -> Callable[..., None]:
    """A command with the shared flags (and ``extra``) that runs ``audit``."""

    def command(**flags: Any) -> None:
        guard(execute_privacy_audit, audit, flags)

    params = list(inspect.signature(_privacy_flags, eval_str=True).parameters.values()) + extra
    command.__signature__ = inspect.Signature(params)  # what typer reads the options from
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


audit_app.command("membership")(_privacy_command("membership", [inspect.Parameter(
    "fail_if_membership_auc_above", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=FailIfMembershipOpt)],
    """A loss-threshold membership-inference attack (Yeom et al., 2018) per site, with and without DP.

    Each method (--methods) trains at every noise multiplier of --noise (0: no DP; above 0:
    client-level DP clipped to --clip); per site, the attack AUC of -loss separating the
    site's training rows from its test rows, for the global and any personal model, next to
    epsilon and the test AUC (the task's: macro-AUC, R2, Dice). Data and training flags are those
    of `medfed run`.
    """))

audit_app.command("privacy")(_privacy_command("privacy", [],
    """Utility (the task's test metrics per site) against the epsilon each site spent, per noise multiplier.

    Each method (--methods) trains at every noise multiplier of --noise (0: no DP); writes
    privacy.json, .csv, .md and privacy.png (AUC against epsilon, log-x). Data and training
    flags are those of `medfed run`.
    """))


# --------------------------------------------------------------------------- gradient inversion


def render_leakage_audit(doc: dict[str, Any], out: Console | None = None) -> None:
    """One row per attacked setting: PSNR, SSIM, the random start's PSNR, labels recovered."""
    from medfed.experiments.inversion import table_cells

    out = out or console
    header, rows = table_cells(doc)
    title = (f"{doc['dataset']}: gradient inversion of site {doc['site']}'s upload ({doc['model']}, "
             f"{doc['attack']['steps']} attack steps); PSNR in dB; Rand: the random start's, Prior: the other "
             "sites' mean image's")
    # one space of padding (and the column rule): ten columns in 72 characters
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 0, 0, 1))
    for h in header:
        table.add_column(h, justify="left" if h in ("Sharing", "SecAgg") else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    out.print(table)
    out.print(f"[dim]settings: {escape(doc['sweep'])}[/]", highlight=False)
    for note in doc["notes"]:
        out.print(f"[dim]{escape(note)}[/]", highlight=False)


def _leakage_values(flags: dict[str, Any]) -> tuple[dict[str, Any], Any, list, str, int]:
    """The study config, the attack, the settings and how they were chosen, the rounds."""
    from medfed.experiments.config import merge, read_toml
    from medfed.experiments.inversion import AttackSpec, parse_factor, sweep

    base = read_toml(flags["config"]) if flags["config"] is not None else {}
    given = [f for f, k in (("--dataset", "dataset"), ("--data", "data"), ("--manifest", "manifest"))
             if flags[k] is not None]
    if len(given) > 1 or (not given and "data" not in base):
        raise ConfigError(
            f"give one data source: --dataset NAME, --data FILE or --manifest FILE, or a [data] table in a "
            f"config file (got {len(given)})"
        )
    base.pop("privacy", None)  # the audit sets DP itself, from --noise and --clip
    factors = {"batch_sizes": "batch_size", "local_steps": "local_steps", "noise": "noise_multiplier",
               "sharing": "sharing", "secure_aggregation": "secure_aggregation"}
    values_of = {factor: parse_factor(f"--{flag.replace('_', '-')}", split_list(flags[flag]), factor)
                 for flag, factor in factors.items()}
    # the sweep's lists are the audit's own; the study's training flags are lr and l2 (and rounds, below)
    study = {k: v for k, v in flags.items() if k not in (*factors, "rounds", "clip")}
    over: dict[str, Any] = {"out": flags["out"], "threads": flags["threads"], "overwrite": bool(flags["overwrite"]),
                            "methods": ["fedavg"]}
    over.update(study_overrides(base, study))
    if flags["model_option"]:
        over["model_options"] = parse_options(flags["model_option"], "--model-option")
    for key in ("seed", "scaling", "model"):
        if flags[key] is not None:
            over[key] = flags[key]
    if flags["rounds"]:
        over.setdefault("training", {})["rounds"] = flags["rounds"]
    values = merge(base, over)
    values.setdefault("model", "cnn2d")
    attack = AttackSpec(steps=flags["attack_steps"], tv=flags["tv"], clip=1.0 if flags["clip"] is None else flags["clip"],
                        secagg_sites=flags["secagg_sites"], site=flags["site"])
    settings, how = sweep(values_of)
    return values, attack, settings, how, flags["rounds"]


def execute_leakage_audit(flags: dict[str, Any]) -> dict[str, Any]:
    """Validate, check the output folder, attack with a progress bar, write the files atomically,
    render; with ``--fail-if-psnr-above X`` exit 5 after writing when a setting's mean PSNR is above X."""
    from medfed.experiments.config import build_config
    from medfed.experiments.harness import load_federation
    from medfed.experiments.inversion import (
        leakage_files,
        run_leakage_audit,
        worst_setting,
    )
    from medfed.experiments.report import output_dir, write_atomically
    from medfed.experiments.results import environment

    values, attack, settings, how, rounds = _leakage_values(flags)
    if rounds < 0:
        raise ConfigError(f"--rounds must be >= 0 (0: attack the initial model), got {rounds}")
    config = build_config(values, str(flags["config"]) if flags["config"] else "flags", flag_for)
    out = config.out
    with output_dir(out, "--out", owns=tuple(leakage_files({})), overwrite=config.overwrite):
        apply_threads(config)
        federation = load_federation(config.data)
        with progress_steps(len(settings) + (1 if rounds else 0)) as step, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # single-class sites show up as undefined metrics
            doc = run_leakage_audit(config, attack, settings, how, rounds=rounds, federation=federation, progress=step)
        doc.update(command=common.COMMAND, environment=environment(config))
        written = write_results(lambda: write_atomically(out, leakage_files(doc)), out)

    def render() -> None:
        render_leakage_audit(doc)
        console.print(f"[dim]{doc['runtime_s']:.2f} s; wrote {', '.join(p.name for p in written)} to "
                      f"{escape(str(out))}[/]", highlight=False)

    show(render, str(out))
    worst = worst_setting(doc)
    threshold = flags["fail_if_psnr_above"]
    if threshold is not None and worst is not None and worst["psnr"] > threshold:
        common.fail(
            f"gradient inversion PSNR {worst['psnr']:.2f} dB > {threshold:g} at batch {worst['batch_size']}, "
            f"steps {worst['local_steps']}, noise {worst['noise_multiplier']:g}, sharing {worst['sharing']}, "
            f"secure aggregation {'on' if worst['secure_aggregation'] else 'off'} (site {doc['site']}); "
            f"the report is in {out}",
            common.EXIT_AUDIT_FAILED,
        )
    return doc


@audit_app.command("leakage")
def leakage(
    out: Annotated[str, typer.Option(help="output folder for leakage.json, .csv, .md and .png")],
    config: ConfigArg = None,
    dataset: DatasetOpt = None,
    data: DataOpt = None,
    manifest: ManifestOpt = None,
    path_column: PathColumnOpt = None,
    kind: KindOpt = None,
    skip_bad: SkipBadOpt = None,
    site_column: SiteColumnOpt = None,
    label_column: LabelColumnOpt = None,
    label_columns: LabelColumnsOpt = None,
    label_column_site: LabelColumnSiteOpt = None,
    mask_column: MaskColumnOpt = None,
    task: TaskOpt = None,
    split_column: SplitColumnOpt = None,
    exclude: ExcludeOpt = None,
    positive_label: PositiveLabelOpt = None,
    dataset_option: DatasetOptionOpt = None,
    model: Annotated[str | None, typer.Option(help="cnn2d, mlp or torch_logistic [default: cnn2d]")] = None,
    model_option: ModelOptionOpt = None,
    site: Annotated[str | None, typer.Option(help="the attacked site [default: the first]")] = None,
    batch_sizes: Annotated[str | None, typer.Option(help="comma-separated images per upload [default: 1,4,8]")] = None,
    local_steps: Annotated[str | None, typer.Option(help="comma-separated local steps per upload [default: 1,5]")] = None,
    noise: Annotated[str | None, typer.Option(help="comma-separated DP noise multipliers; 0 = no DP [default: 0,0.1,1]")] = None,
    clip: Annotated[float | None, typer.Option(help="DP: the L2 bound C of the upload (noise std z x C) [default: 1]")] = None,
    sharing: Annotated[str | None, typer.Option(help="comma-separated sharing policies: none, fedper (head private) "
                                                     "[default: none,fedper]")] = None,
    secure_aggregation: Annotated[str | None, typer.Option(
        help="comma-separated off, on (the server sees only the sum of K sites' uploads) [default: off,on]")] = None,
    secagg_sites: Annotated[int | None, typer.Option(help="K, the sites summed under secure aggregation [default: all]")] = None,
    attack_steps: Annotated[int, typer.Option(help="Adam iterations of the inversion")] = 1000,
    tv: Annotated[float, typer.Option(help="weight of the total-variation prior")] = 1e-4,
    rounds: Annotated[int, typer.Option(help="FedAvg rounds before the attacked upload (0: the initial model)")] = 1,
    lr: LrOpt = None,
    l2: L2Opt = None,
    scaling: ScalingOpt = None,
    seed: Annotated[int | None, typer.Option(help="seed of the split, the images attacked, DP noise and the attack [default: 0]")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="threads torch models compute with [default: 1]")] = None,
    fail_if_psnr_above: Annotated[float | None, typer.Option(
        help="after writing the report, exit with status 5 naming the setting when a mean PSNR is above this")] = None,
    overwrite: OverwriteOpt = None,
) -> None:
    """Gradient inversion of one site's upload: iDLG labels and Geiping et al.'s reconstruction
    (binary and multiclass tasks; the others are refused).

    An honest-but-curious server attacks the upload the site computes from the global model
    (after --rounds FedAvg rounds), across batch size, local steps, DP noise, sharing policy
    and secure aggregation (one factor at a time around batch 1, steps 1, no noise, no
    sharing policy, no secure aggregation); PSNR and SSIM per image, a PNG grid. One attack:
    a lower bound on leakage, not a proof of privacy.
    """
    guard(execute_leakage_audit, dict(locals()))
