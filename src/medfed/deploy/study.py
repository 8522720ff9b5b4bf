"""A deployed study: a ``medfed run`` config whose ``[data]`` is the sites' table schema (no
path: each hospital brings its own file) plus ``[deploy]`` (the sites that may join, the
answers a round needs, how long a round waits).

The coordinator reads ``STUDY.toml`` and sends the validated study to every site at setup;
a site builds the same config from it, so both halves of every method are built from
``(name, options)`` and the same training settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfed.errors import ConfigError
from medfed.experiments.config import ExperimentConfig, build_config, read_toml
from medfed.methods import resolve_methods

# what a site's file must not change about the study, and what only the coordinator needs
_COORDINATOR_ONLY = {"out", "overwrite", "plots", "plot_formats", "workers", "executor", "ray_address", "drop", "resume"}


def load_study(path: Path) -> ExperimentConfig:
    """``STUDY.toml`` as a validated config, refused in one line if it cannot be deployed."""
    values = read_toml(Path(path))
    config = build_config(values, str(path), schema_only=True)
    return check_deployable(config, str(path))


def check_deployable(config: ExperimentConfig, source: str) -> ExperimentConfig:
    """A study a deployment can run: [deploy] sites, a data schema without a source, what
    :func:`check_settings` asks, and min_sites within the sites."""
    if config.deploy is None:
        raise ConfigError(f"{source}: a deployed study needs a [deploy] table with sites = [...]")
    data = config.data
    if any(v is not None for v in (data.dataset, data.path, data.manifest, data.npz)):
        raise ConfigError(
            f"{source}: [data] of a deployed study names no data source (each site gives its own file with "
            "`medfed deploy site --data FILE`); keep only the schema: site_column, label_column, "
            "split_column, features, impute, positive_label, exclude, task, label_columns, mask_column"
        )
    check_settings(config, source, manifest=config.deploy.site_files == "manifest")
    need = config.deploy.min_sites or config.training.min_sites
    if need > len(config.deploy.sites):
        raise ConfigError(f"{source}: min_sites is {need}, but [deploy] lists {len(config.deploy.sites)} site(s)")
    return config


def check_settings(config: ExperimentConfig, source: str, *, manifest: bool) -> None:
    """Settings a deployment can run: federated methods only (nothing pools or moves rows), no
    categorical columns yet, no table options for image manifests, targets the sites' kind of
    file holds (masks in manifests, several label columns in tables), a harmonization of the
    sites' kind of data."""
    data = config.data
    if manifest and (data.features or data.exclude or data.impute or data.covariates):
        raise ConfigError(
            f"{source}: features, exclude, impute and covariates apply to tables; with [deploy] site_files = "
            "\"manifest\" each site's file lists image files"
        )
    # what each harmonization adjusts: combat a table's features, frequency images
    wants = {"combat": ("feature tables", False), "frequency": ("images", True)}.get(config.harmonize.method)
    if wants is not None and wants[1] != manifest:
        raise ConfigError(f"{source}: [harmonize] method = \"{config.harmonize.method}\" adjusts {wants[0]}; this "
                          f"study's sites give {'image manifests' if manifest else 'feature tables'}")
    # the targets each kind of site file holds (as medfed run reads a --data table or a --manifest)
    if manifest and data.label_columns:
        raise ConfigError(f"{source}: label_columns (a multilabel task) name a table's columns; with [deploy] "
                          "site_files = \"manifest\" each site's file lists image files")
    if not manifest and (data.mask_column or data.task == "segmentation"):
        raise ConfigError(f"{source}: a segmentation task reads each image's mask from a manifest's mask column; "
                          "set [deploy] site_files = \"manifest\"")
    if data.label_column_site and manifest:
        raise ConfigError(f"{source}: [data] label_column_site gives the sites' tables their own label columns; "
                          "image manifests take one label column")
    if data.labeled_fraction != 1.0 or data.labeled_fraction_site:  # hidden per repeat by the harness's split
        raise ConfigError(f"{source}: [data] labeled_fraction and labeled_fraction_site hide labels in simulation "
                          "(medfed run) only so far; a deployed site trains on every label its file holds")
    from medfed.experiments.harness import check_secure_study

    check_secure_study(config)
    if data.categorical:
        raise ConfigError(
            f"{source}: data.categorical is not supported in a deployed study yet (its levels need a setup "
            "exchange of their own); encode those columns as numbers in the sites' files"
        )
    methods = resolve_methods(config.methods, config.method_options, config.pipelines)
    central = [spec.name for spec, _ in methods if spec.kind != "federated"]
    if central:
        raise ConfigError(
            f"{source}: {', '.join(central)} pool or move rows between sites and cannot be deployed; "
            "list only federated methods in `methods`"
        )
    from medfed.experiments.harness import check_teacher_study, check_unlabeled_study

    # what a method learning from unlabeled rows, or distilling, cannot combine with, as in simulation; the
    # teacher file itself is each site's (its path resolved and its fit checked at the site's setup)
    check_unlabeled_study(config, methods)
    check_teacher_study(config, None, methods)


def study_payload(config: ExperimentConfig) -> dict[str, Any]:
    """What a site receives of the study: everything that shapes its numbers, nothing local to
    the coordinator (its output folder, plot settings)."""
    return config.model_dump(mode="json", exclude=_COORDINATOR_ONLY)


def study_from_payload(payload: dict[str, Any]) -> ExperimentConfig:
    return build_config(payload, "the study the coordinator sent", schema_only=True)


def site_min_sites(config: ExperimentConfig) -> int:
    return config.deploy.min_sites or config.training.min_sites
