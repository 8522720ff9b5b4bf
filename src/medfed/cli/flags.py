"""Flags that several commands share, declared once: where the data come from and how training runs.

``medfed run`` and ``medfed audit robustness`` take the same data and training flags; each
command lists the aliases below in its signature and turns the values it got into config
overrides with :func:`data_values` and :func:`training_values`, so the two cannot drift apart.
"""

from __future__ import annotations

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
KindOpt = Annotated[str | None, typer.Option(help="image files: auto, nifti, dicom or image (2D)")]
SkipBadOpt = Annotated[
    bool | None,
    typer.Option("--skip-bad/--no-skip-bad", help="skip unreadable or inconsistent image files, counted in the report"),
]
SiteColumnOpt = Annotated[str | None, typer.Option(help="column naming each row's site")]
LabelColumnOpt = Annotated[str | None, typer.Option(help="column holding the label")]
SplitColumnOpt = Annotated[str | None, typer.Option(help="column with train/test per row")]
FeaturesOpt = Annotated[str | None, typer.Option(help="comma-separated feature columns [default: all others]")]
ExcludeOpt = Annotated[str | None, typer.Option(help="comma-separated table columns to leave out")]
CategoricalOpt = Annotated[
    str | None, typer.Option(help="comma-separated string columns to one-hot encode (levels from training rows)")
]
ImputeOpt = Annotated[
    str | None, typer.Option(help="fill missing values: mean or median (training rows of each site)")
]
PositiveLabelOpt = Annotated[str | None, typer.Option(help="label value that counts as positive")]
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
BatchSizeOpt = Annotated[int | None, typer.Option(help="mini-batch size [default: full batch]")]
FractionFitOpt = Annotated[float | None, typer.Option(help="fraction of sites selected per round")]
MinSitesOpt = Annotated[int | None, typer.Option(help="minimum number of sites per round")]
MaxUpdateNormOpt = Annotated[
    float | None, typer.Option(help="the server rejects uploads whose update norm is larger")
]
ScalingOpt = Annotated[str | None, typer.Option(help="global, site or none")]
MethodOptionOpt = Annotated[list[str] | None, typer.Option(help="METHOD.KEY=VALUE, e.g. fedprox.mu=0.01")]


def data_values(
    base: dict[str, Any],
    *,
    dataset: str | None = None,
    data: Path | None = None,
    manifest: Path | None = None,
    dataset_option: list[str] | None = None,
    **columns: Any,
) -> dict[str, Any]:
    """The ``data`` overrides the data flags give. A source given by a flag (``--dataset``,
    ``--data``, ``--manifest``) replaces the config file's ``[data]`` table (``base`` is edited),
    so a file's table columns never leak into another source. ``columns``: path_column, kind,
    skip_bad, site_column, label_column, split_column, features, exclude, categorical, impute,
    positive_label as the flags give them (comma lists as text)."""
    out: dict[str, Any] = {}
    if dataset is not None or data is not None or manifest is not None:
        base.pop("data", None)
        out = {"dataset": dataset, "path": str(data) if data else None, "manifest": str(manifest) if manifest else None}
    for key, value in columns.items():
        if key in ("features", "exclude", "categorical"):
            value = split_list(value)
        if value is not None:
            out[key] = value
    if dataset_option:
        out["options"] = parse_options(dataset_option, "--dataset-option")
    return out


def training_values(**values: Any) -> dict[str, Any]:
    """The ``training`` overrides of the training flags that were given."""
    return {k: v for k, v in values.items() if v is not None}
