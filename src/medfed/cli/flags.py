"""Flags that several commands share, declared once: where the data come from and how training runs.

``medfed run`` and ``medfed audit robustness`` take the same data and training flags; each
command lists the aliases below in its signature and turns the values it got into config
overrides with :func:`study_overrides`, so the two cannot drift apart.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from medfed.cli.common import parse_options, split_list

ConfigArg = Annotated[Path | None, typer.Argument(help="experiment TOML file (flags override it)")]
DatasetOpt = Annotated[str | None, typer.Option(help="embedded data set name (see `medfed datasets`)")]
DataOpt = Annotated[Path | None, typer.Option(help="CSV or Parquet table, one row per subject")]
ManifestOpt = Annotated[
    Path | None, typer.Option(help="CSV/Parquet manifest of image files: path, label, site[, split]")
]
PathColumnOpt = Annotated[str | None, typer.Option(help="manifest column with each image's file or DICOM folder")]
MaskColumnOpt = Annotated[str | None, typer.Option(help="manifest column with each image's mask file: a segmentation task "
                                                        "[default: 'mask' with --task segmentation, else no masks]")]
KindOpt = Annotated[str | None, typer.Option(help="image files: auto, nifti, dicom or image (2D)")]
SkipBadOpt = Annotated[
    bool | None,
    typer.Option("--skip-bad/--no-skip-bad", help="skip unreadable or inconsistent image files, counted in the report"),
]
SiteColumnOpt = Annotated[str | None, typer.Option(help="column naming each row's site")]
LabelColumnOpt = Annotated[str | None, typer.Option(help="column holding the label")]
LabelColumnsOpt = Annotated[str | None, typer.Option(help="comma-separated 0/1 label columns of a multilabel task "
                                                          "(instead of --label-column)")]
SplitColumnOpt = Annotated[str | None, typer.Option(help="column with train/test per row")]
FeaturesOpt = Annotated[str | None, typer.Option(help="comma-separated feature columns [default: all others]")]
ExcludeOpt = Annotated[str | None, typer.Option(help="comma-separated table columns to leave out")]
CategoricalOpt = Annotated[
    str | None, typer.Option(help="comma-separated string columns to one-hot encode (levels from training rows)")
]
CovariatesOpt = Annotated[
    str | None, typer.Option(help="comma-separated covariates harmonization preserves, e.g. age,sex (never features)")
]
HarmonizeOpt = Annotated[
    str | None, typer.Option(help="remove site effects first: none, combat (federated ComBat, feature tables) or "
                                  "frequency (low-band amplitude spectra, images)")
]
EbOpt = Annotated[
    bool | None, typer.Option("--eb/--no-eb", help="ComBat: empirical-Bayes site effects (--no-eb: per-site moments)")
]
BandOpt = Annotated[
    float | None, typer.Option(help="--harmonize frequency: the low band, in cycles per pixel, in (0, 0.5] [default: 0.1]")
]
StrengthOpt = Annotated[
    float | None, typer.Option(help="--harmonize frequency: how far each image's low-band amplitude moves toward the "
                                    "federation's, in [0, 1] [default: 1]")
]
ImputeOpt = Annotated[
    str | None, typer.Option(help="fill missing values: mean or median (training rows of each site)")
]
PositiveLabelOpt = Annotated[str | None, typer.Option(help="label value that counts as positive")]
TaskOpt = Annotated[str | None, typer.Option(help="what the label is: binary, multiclass, regression, multilabel or segmentation (masks) [default: "
                                                  "inferred from the label column where unambiguous]")]
UnlabeledValueOpt = Annotated[str | None, typer.Option(
    help="label value that marks an unlabeled row (a training row without a target), besides an empty cell")]
LabeledFractionOpt = Annotated[float | None, typer.Option(
    help="keep the labels of this share of each site's training rows, in (0, 1] (seeded, stratified) [default: 1]")]
LabelColumnSiteOpt = Annotated[list[str] | None, typer.Option(
    help="SITE=COL: that site's own label column (a multi-task study, --method multitask); repeatable")]
LabeledFractionSiteOpt = Annotated[list[str] | None, typer.Option(
    help="SITE=F: that site's own labeled fraction; repeatable")]
DatasetOptionOpt = Annotated[
    list[str] | None, typer.Option(help="KEY=VALUE option of the embedded data set, e.g. n_sites=8")
]
ModelOpt = Annotated[str | None, typer.Option(help="logistic (tables), torch_logistic, mlp, cnn2d, cnn3d")]
ModelOptionOpt = Annotated[list[str] | None, typer.Option(help="KEY=VALUE option of the model, e.g. norm=group")]

RoundsOpt = Annotated[int | None, typer.Option(help="communication rounds")]
LocalStepsOpt = Annotated[int | None, typer.Option(help="local iterations per round")]
LocalEpochsOpt = Annotated[
    float | None, typer.Option(help="local passes over each site's rows per round (instead of --local-steps)")
]
LrOpt = Annotated[float | None, typer.Option(help="learning rate")]
L2Opt = Annotated[float | None, typer.Option(help="L2 penalty (l2/2)||w||^2")]
LossOpt = Annotated[str | None, typer.Option(help="classification loss: ce, gce (generalized cross-entropy) or sce "
                                                  "(symmetric cross-entropy), both robust to noisy labels [default: ce]")]
LossOptionOpt = Annotated[list[str] | None, typer.Option(
    help="KEY=VALUE option of --loss: gce q=0.7 (0 < q <= 1); sce alpha=0.1, beta=1 (>= 0); repeatable")]
BatchSizeOpt = Annotated[int | None, typer.Option(help="mini-batch size [default: full batch]")]
FractionFitOpt = Annotated[float | None, typer.Option(help="fraction of sites selected per round")]
MinSitesOpt = Annotated[int | None, typer.Option(help="minimum number of sites per round")]
MaxUpdateNormOpt = Annotated[
    float | None, typer.Option(help="the server rejects uploads whose update norm is larger")
]
ScalingOpt = Annotated[str | None, typer.Option(help="global, site or none")]
ThresholdOpt = Annotated[str | None, typer.Option(
    help="decision threshold of ACC/SEN/SPE/BACC/F1: 0.5, youden or prevalence (chosen on training rows only)")]
OverwriteOpt = Annotated[
    bool | None,
    typer.Option("--overwrite", help="replace files in --out that medfed did not write (or that changed since)"),
]
ExecutorOpt = Annotated[
    str | None,
    typer.Option(help="where sites run: inprocess; process (one process per site, owning its rows and state); "
                      "vectorized (the cohort as one array program: numpy models of every table task, FedAvg/FedProx/FedSGD/"
                      "SCAFFOLD site rules; torch models with SGD, no BatchNorm: FedAvg/FedProx via vmap); ray (sites as Ray actors: --ray-address, or Ray on this machine); flower (a Flower deployment on 127.0.0.1, one SuperNode per site)"),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(help="with --executor ray: a running Ray cluster's address (default: start Ray on this machine)"),
]
ResumeOpt = Annotated[
    bool | None,
    typer.Option("--resume", help="checkpoint every round in --out and continue an interrupted run from there"),
]
DropOpt = Annotated[
    list[str] | None,
    typer.Option(help="inject a dropout: SITE@ROUND or SITE@FIRST-LAST (rounds from 1); repeatable"),
]
SaveModelOpt = Annotated[
    bool | None,
    typer.Option("--save-model", help="also write repeat 1's model of each setting to OUT/models/<Setting>.npz "
                                      "(for `medfed predict`)"),
]
DpOpt = Annotated[str | None, typer.Option(help="differential privacy: none, client (clip each update, noise the mean), "
                                                "distributed (each site noises its update; needs --secure-aggregation) "
                                                "or sample (DP-SGD)")]
ClipOpt = Annotated[float | None, typer.Option(help="DP: the L2 bound C of each site's update")]
NoiseOpt = Annotated[float | None, typer.Option(help="DP: noise multiplier z (noise std = z x sensitivity)")]
DeltaOpt = Annotated[float | None, typer.Option(help="DP: delta of the (epsilon, delta) guarantee [default: 1e-5]")]
TargetEpsilonOpt = Annotated[float | None, typer.Option(help="DP: calibrate z so every site ends at epsilon <= E")]
AccountantOpt = Annotated[str | None, typer.Option(help="DP accountant (dp-accounting): pld or rdp")]
AdaptiveClipOpt = Annotated[bool | None, typer.Option("--adaptive-clip", help="DP: adapt the clip each round toward the median update norm (Andrew et al., 2021)")]
CompressOpt = Annotated[str | None, typer.Option(help="upload compression: none, lossless, q8, q4, topk:FRACTION (error feedback)")]
SecureAggregationOpt = Annotated[bool | None, typer.Option(
    "--secure-aggregation", help="SecAgg+: the server receives masked uploads and unmasks only their sum (needs --clip)")]
SecureThresholdOpt = Annotated[int | None, typer.Option(help="secure aggregation: shares needed to unmask a site, fitted "
                                                              "into k/2+1..k each round (recorded) [default: k/2+1]")]
SecureDegreeOpt = Annotated[int | None, typer.Option(help="secure aggregation: neighbours per site, at most K-1 and even "
                                                           "below it each round (recorded) [default: 2 ceil(log2 K)]")]
PRIVACY_FLAGS = ("dp", "clip", "noise", "delta", "target_epsilon", "accountant", "adaptive_clip",
                 "secure_aggregation", "secure_threshold", "secure_degree")
MethodOptionOpt = Annotated[list[str] | None, typer.Option(help="METHOD.KEY=VALUE, e.g. fedprox.mu=0.01")]


DATA_FLAGS = (
    "path_column", "mask_column", "kind", "skip_bad", "site_column", "label_column", "label_columns", "split_column", "features", "exclude",
    "categorical", "impute", "positive_label", "covariates", "task", "unlabeled_value", "labeled_fraction",
)
TRAINING_FLAGS = (
    "rounds", "local_steps", "local_epochs", "lr", "l2", "batch_size", "fraction_fit", "min_sites", "max_update_norm",
    "loss",
)


_SOURCES = ("dataset", "path", "manifest", "npz")


def study_overrides(base: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` and ``training`` overrides a command's flags give; ``given`` maps each of the
    command's parameter names to its value (the names above).

    A source given by a flag (``--dataset``, ``--data``, ``--manifest``) replaces the config
    file's ``[data]`` table (``base`` is edited), so a file's table columns never leak into
    another source -- unless that table names no source: then it is the study's data schema
    (a deployed study's ``STUDY.toml``) and the flag only adds where the rows are. Comma lists (``--features a,b``) become lists.
    """
    data: dict[str, Any] = {}
    if any(given.get(k) is not None for k in ("dataset", "data", "manifest")):
        table = base.get("data")
        if isinstance(table, dict) and not any(table.get(k) is not None for k in _SOURCES):
            pass  # a study's [data] schema without a source (a deployed study's): the flag gives its source
        else:
            base.pop("data", None)
        data = {"dataset": given.get("dataset"), "path": _text(given.get("data")),
                "manifest": _text(given.get("manifest"))}
    for key in DATA_FLAGS:
        value = given.get(key)
        if key in ("features", "exclude", "categorical", "covariates", "label_columns"):
            value = split_list(value)
        if value is not None:
            data[key] = value
    if given.get("label_column_site"):
        data["label_column_site"] = {site: str(column) for site, column in
                                     parse_options(given["label_column_site"], "--label-column-site").items()}
    if given.get("labeled_fraction_site"):
        data["labeled_fraction_site"] = parse_options(given["labeled_fraction_site"], "--labeled-fraction-site")
    if given.get("dataset_option"):
        data["options"] = parse_options(given["dataset_option"], "--dataset-option")
    training = {k: given[k] for k in TRAINING_FLAGS if given.get(k) is not None}
    if given.get("loss_option"):
        training["loss_options"] = parse_options(given["loss_option"], "--loss-option")
    privacy = {k: given[k] for k in PRIVACY_FLAGS if given.get(k) is not None}
    harmonize = {k: v for k, v in (("method", given.get("harmonize")), ("eb", given.get("eb")),
                                   ("band", given.get("band")), ("strength", given.get("strength"))) if v is not None}
    evaluation = {"threshold": given["threshold"]} if given.get("threshold") is not None else {}
    return {key: value for key, value in (("data", data), ("training", training), ("privacy", privacy),
                                          ("harmonize", harmonize), ("evaluation", evaluation)) if value}


def with_method_flags(after: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command a flag for every option the methods declare as one (``--mu``,
    ``--server-lr``, ...; :data:`medfed.methods.registry.METHOD_FLAGS`), placed after its
    parameter ``after``. The command receives them as ``method_flags``: option name ->
    ``(flag, value or None)``."""
    from medfed.methods.registry import METHOD_FLAGS

    by_parameter = {f.flag.removeprefix("--").replace("-", "_"): f for f in METHOD_FLAGS.values()}
    added = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[{"float": float, "int": int, "str": str}[f.type] | None,
                                 typer.Option(f.flag, help=f"{f.help} ({', '.join(f.methods)})")],
        )
        for name, f in by_parameter.items()
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "method_flags"]
        at = next(i for i, p in enumerate(own) if p.name == after) + 1
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        params[at:at] = added

        @functools.wraps(command)
        def with_flags(**values: Any) -> Any:
            flags = {f.option: (f.flag, values.pop(name)) for name, f in by_parameter.items()}
            return command(**values, method_flags=flags)

        with_flags.__signature__ = inspect.Signature(params)  # what typer reads the options from
        with_flags.__annotations__ = {p.name: p.annotation for p in params}
        return with_flags

    return decorate


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)
