"""Flags that several commands share, declared once: where the data come from and how training runs.

``medfed run`` and ``medfed audit robustness`` take the same data and training flags; each
command lists the aliases below in its signature and turns the values it got into config
overrides with :func:`study_overrides`, so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
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
OverwriteOpt = Annotated[
    bool | None,
    typer.Option("--overwrite", help="replace files in --out that medfed did not write (or that changed since)"),
]
SaveModelOpt = Annotated[
    bool | None,
    typer.Option("--save-model", help="also write repeat 1's model of each setting to OUT/models/<Setting>.npz "
                                      "(for `medfed predict`)"),
]
MethodOptionOpt = Annotated[list[str] | None, typer.Option(help="METHOD.KEY=VALUE, e.g. fedprox.mu=0.01")]


DATA_FLAGS = (
    "path_column", "kind", "skip_bad", "site_column", "label_column", "split_column", "features", "exclude",
    "categorical", "impute", "positive_label",
)
TRAINING_FLAGS = (
    "rounds", "local_steps", "local_epochs", "lr", "l2", "batch_size", "fraction_fit", "min_sites", "max_update_norm",
)


def study_overrides(base: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` and ``training`` overrides a command's flags give; ``given`` maps each of the
    command's parameter names to its value (the names above).

    A source given by a flag (``--dataset``, ``--data``, ``--manifest``) replaces the config
    file's ``[data]`` table (``base`` is edited), so a file's table columns never leak into
    another source. Comma lists (``--features a,b``) become lists.
    """
    data: dict[str, Any] = {}
    if any(given.get(k) is not None for k in ("dataset", "data", "manifest")):
        base.pop("data", None)
        data = {"dataset": given.get("dataset"), "path": _text(given.get("data")),
                "manifest": _text(given.get("manifest"))}
    for key in DATA_FLAGS:
        value = given.get(key)
        if key in ("features", "exclude", "categorical"):
            value = split_list(value)
        if value is not None:
            data[key] = value
    if given.get("dataset_option"):
        data["options"] = parse_options(given["dataset_option"], "--dataset-option")
    training = {k: given[k] for k in TRAINING_FLAGS if given.get(k) is not None}
    return {key: value for key, value in (("data", data), ("training", training)) if value}


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)
