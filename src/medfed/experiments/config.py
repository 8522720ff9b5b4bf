"""Experiment configuration: pydantic models, loadable from TOML and overridable by flags.

Every value has a default matching the survey's §6 protocol where the survey states one
(10 local iterations, FedProx mu = 0.1, 5 repeats of a stratified 80/20 split).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from medfed.errors import ConfigError
from medfed.models.losses import RobustLoss, make_loss

DEFAULT_METHODS = ["cross", "single", "mix", "fedavg", "fedsgd", "fedprox"]
PLOT_FORMATS = ("png", "pdf", "svg")  # what matplotlib writes without extra packages


class _Strict(BaseModel):
    # inf and nan are never a meaningful setting; accepted, they fail after training
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _first_non_finite(value: Any, key: str = "") -> tuple[str, float] | None:
    """The dotted key and value of the first inf/nan inside a free-form option value."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for k, v in items:
        found = _first_non_finite(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def _finite_options(value: Any) -> Any:
    """Free-form option tables (model, method, data-set options) hold finite numbers only;
    the error carries the key inside the table, which the message appends to the field."""
    found = _first_non_finite(value)
    if found:
        raise PydanticCustomError(
            "non_finite", "Input should be a finite number, got {value}", {"key": found[0], "value": str(found[1])}
        )
    return value


class DataSpec(_Strict):
    """Where the sites come from: an embedded data set, or a table on disk."""

    dataset: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    path: Path | None = None
    manifest: Path | None = None
    npz: dict[str, Path] | None = None  # MedMNIST-format files, site name -> path
    positive_classes: list[int] | None = None  # MedMNIST files: binary with these positive; None: every class
    use_val: Literal["train", "test", "drop"] = "train"
    path_column: str = "path"
    # a manifest's column of mask files (a segmentation task); None: "mask" when task is segmentation, else no masks
    mask_column: str | None = None
    kind: Literal["auto", "nifti", "dicom", "image"] = "auto"
    skip_bad: bool = False
    site_column: str | None = None
    label_column: str | None = None
    label_columns: list[str] | None = None  # a multilabel task's 0/1 label columns (instead of label_column)
    # site name -> that site's own label column (a multi-task study); sites not named read label_column
    label_column_site: dict[str, str] = Field(default_factory=dict)
    split_column: str | None = None
    features: list[str] | None = None
    impute: Literal["mean", "median"] | None = None
    positive_label: str | None = None
    # what the label is (medfed.data.tasks); None: inferred from a table's label column
    task: Literal["binary", "multiclass", "regression", "multilabel", "segmentation"] | None = None
    exclude: list[str] | None = None  # table columns to drop
    categorical: list[str] | None = None  # table columns to one-hot encode (levels from training rows)
    # numbers every row carries beside the features (never features), for harmonization to preserve
    covariates: list[str] | None = None
    # a regression target trained as (y - mean) / std, mean and std pooled from the training sites' moments
    # (medfed.data.tasks.TargetScale); predictions are mapped back before every metric. False: trained raw
    standardize_target: bool = True
    # a table's label value that marks an unlabeled row (besides an empty cell): a training row without a target
    unlabeled_value: str | None = None
    # the share of each site's training rows whose labels are kept (a seeded, stratified draw per repeat); the
    # others become unlabeled training rows. 1: every label kept
    labeled_fraction: float = 1.0
    labeled_fraction_site: dict[str, float] = Field(default_factory=dict)  # site name -> its own labeled fraction

    _finite = field_validator("options")(_finite_options)

    @field_validator("labeled_fraction")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"a labeled fraction must lie in (0, 1], got {value:g}")
        return value

    @field_validator("labeled_fraction_site")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {site: f for site, f in value.items() if not 0 < f <= 1}
        if bad:
            site, f = next(iter(bad.items()))
            raise ValueError(f"--labeled-fraction-site {site}={f:g}: a labeled fraction must lie in (0, 1]")
        return value

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> DataSpec:
        sources = [s for s in (self.dataset, self.path, self.manifest, self.npz) if s is not None]
        if not sources and (info.context or {}).get("schema_only"):
            # a deployed study's [data]: the schema of the sites' tables; each site names its own file
            # the targets: a label column, a multilabel task's label columns, or a manifest's masks
            targets = (self.label_column or self.label_columns or self.label_column_site or self.mask_column
                       or self.task == "segmentation")
            if self.site_column is None or not targets:
                raise ValueError("a deployed study's [data] needs site_column and label_column (or label_columns; "
                                 "a segmentation manifest's mask_column)")
            return self
        if len(sources) != 1:
            raise ValueError(
                "give exactly one of data.dataset (embedded name), data.path (a table file), "
                "data.manifest (a table of image files) or data.npz (MedMNIST files by site)"
            )
        if self.path is not None and (self.site_column is None or (
                self.label_column is None and not self.label_columns and not self.label_column_site)):
            raise ValueError("a table needs data.site_column and data.label_column (or data.label_columns, or "
                             "data.label_column_site naming every site)")
        if self.label_column_site and self.path is None:
            raise ValueError("--label-column-site (data.label_column_site) applies to a table given with --data "
                             "(data.path); mni-phantom has its own multi-task data (--dataset-option task=multitask)")
        if self.unlabeled_value is not None and self.path is None and self.manifest is None:
            raise ValueError("--unlabeled-value (data.unlabeled_value) applies to a table (--data) or an image "
                             "manifest (--manifest)")
        if self.mask_column is not None and self.manifest is None:
            raise ValueError("--mask-column (data.mask_column) applies to a manifest of image files (--manifest)")
        if self.label_columns and self.path is None:
            raise ValueError("--label-columns (data.label_columns) apply to a table given with --data (data.path)")
        if self.path is None and (self.exclude or self.categorical):
            given = " and ".join(f for f, v in (("--exclude", self.exclude), ("--categorical", self.categorical)) if v)
            raise ValueError(
                f"{given} (data.exclude, data.categorical) apply to a table given with --data (data.path); "
                "embedded data sets, manifests and npz files have fixed numeric features"
            )
        return self


class DeploySpec(_Strict):
    """``[deploy]`` of a study run across hospitals (``medfed deploy server``): the sites that may
    join, in the order whose position keys their splits, how many must answer for a round to
    count, and how long a round waits for them. Simulation (``medfed run``) ignores it."""

    sites: list[str] = Field(min_length=1)
    site_files: Literal["table", "manifest"] = Field(
        "table", description="what each site's --data file is: a table of features, or a manifest of image files")
    min_sites: int | None = Field(None, ge=1, description="answers a round needs [default: training.min_sites]")
    round_timeout_s: float = Field(120.0, gt=0, description="seconds a round waits for the sites' answers")
    join_timeout_s: float = Field(
        600.0, gt=0, description="seconds the coordinator waits for every listed site to connect before setup")

    @field_validator("sites")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        twice = sorted({s for s in value if value.count(s) > 1})
        if twice:
            raise ValueError(f"lists {twice[0]!r} twice; each site once")
        bad = [s for s in value if not s or not all(c.isalnum() or c in "-_." for c in s)]
        if bad:
            raise ValueError(f"site name {bad[0]!r}: use letters, digits, '-', '_' or '.'")
        return value


class PrivacySpec(_Strict):
    """``[privacy]``: differential privacy of the federated settings. ``dp = "client"`` is
    client-level DP (McMahan et al., 2018): each site's update clipped to ``clip``, Gaussian
    noise ``noise`` x sensitivity on the server's fixed-denominator mean, sites sampled by
    Poisson with rate ``training.fraction_fit``; epsilon at ``delta`` from dp-accounting."""

    dp: Literal["none", "client", "distributed", "sample"] = "none"
    clip: float | None = Field(None, gt=0, description="L2 bound of each site's update (client level)")
    noise: float | None = Field(None, ge=0, description="noise multiplier z: noise std = z x sensitivity")
    delta: float = Field(1e-5, gt=0, lt=1)
    target_epsilon: float | None = Field(None, gt=0, description="calibrate z so that every site ends at eps <= this")
    accountant: Literal["pld", "rdp"] = "pld"
    adaptive_clip: bool = Field(False, description="adapt the clip each round toward the median update norm "
                                "(Andrew et al., 2021); clip is then the first round's bound")
    secure_aggregation: bool = Field(False, description="the server receives only masked uploads and unmasks their "
                                     "sum (SecAgg+, Bonawitz et al., 2017; Bell et al., 2020); needs clip")
    secure_threshold: int | None = Field(None, ge=1, description="SecAgg+ threshold t: shares needed to unmask a site "
                                         "[default: floor(k/2)+1]")
    secure_degree: int | None = Field(None, ge=1, description="SecAgg+ neighbours per site k [default: 2 ceil(log2 K)]")

    @model_validator(mode="after")
    def _complete(self) -> PrivacySpec:
        if self.secure_aggregation and self.clip is None:
            raise ValueError("secure aggregation needs clip (--clip C): each site's update is clipped to L2 norm C, "
                             "the range its entries take in the masked fixed-point ring")
        if self.secure_aggregation and self.dp == "sample":
            raise ValueError("secure aggregation with dp = \"sample\" is not available: its clip bounds each row's "
                             "gradient, not the update the ring needs; use dp = \"client\" or \"distributed\"")
        if self.dp == "none":
            return self
        if self.dp == "distributed" and not self.secure_aggregation:
            raise ValueError("dp = 'distributed' needs secure aggregation (--secure-aggregation): the sites' noise "
                             "protects only a sum the server cannot see apart")
        if self.dp == "distributed" and self.adaptive_clip:
            raise ValueError("adaptive_clip is not available with dp = \"distributed\" (its clipped count would need "
                             "the sites' noise too); give a fixed clip or use dp = \"client\"")
        if self.dp == "sample" and self.adaptive_clip:
            raise ValueError("adaptive_clip adapts client-level DP's clip; with dp = \"sample\" give a fixed clip")
        if self.clip is None:
            what = "each row's gradient" if self.dp == "sample" else "each site's update"
            raise ValueError(f"{self.dp}-level DP needs clip (--clip C), the L2 bound of {what}")
        if (self.noise is None) == (self.target_epsilon is None):
            raise ValueError("give the noise multiplier (--noise Z) or a target epsilon (--target-epsilon E), one of them")
        return self


FREQUENCY_DEFAULTS = {"band": 0.1, "strength": 1.0}


class HarmonizeSpec(_Strict):
    """``[harmonize]``: remove site effects before any setting sees the data. ``combat``
    (feature tables) is federated ComBat (:mod:`medfed.data.harmonize`), preserving the effects
    of ``data.covariates``; ``frequency`` (images) moves each image's low-frequency amplitude
    toward the federation's mean by ``strength`` (:mod:`medfed.data.frequency`). Fitted per
    repeat on every training site's training rows, from their statistics only, and applied to
    every site's training and test rows."""

    method: Literal["none", "combat", "frequency"] = "none"
    eb: bool = Field(True, description="empirical-Bayes estimates of each site's location/scale (--no-eb: moments)")
    band: float | None = Field(None, gt=0, le=0.5,
                               description="frequency: the low band, in cycles per pixel (0.5: all) [default 0.1]")
    strength: float | None = Field(None, ge=0, le=1,
                                   description="frequency: how far each image's low-band amplitude moves [default 1]")

    @model_validator(mode="before")
    @classmethod
    def _frequency_defaults(cls, values: Any) -> Any:
        # set for frequency only, so that another method's dump round-trips without them
        if isinstance(values, dict) and values.get("method") == "frequency":
            values = {**FREQUENCY_DEFAULTS, **{k: v for k, v in values.items() if v is not None}}
        return values

    @model_validator(mode="after")
    def _options_of_the_method(self) -> HarmonizeSpec:
        # an option of the other method would be silently ignored
        if self.method != "frequency" and (self.band is not None or self.strength is not None):
            raise ValueError("band and strength (--band, --strength) are options of method = \"frequency\"")
        if self.method != "combat" and not self.eb:
            raise ValueError("eb (--no-eb) is an option of method = \"combat\"")
        return self


class TrainingSpec(_Strict):
    """Optimization shared by every setting: each site (and each centralized model) runs
    gradient descent with these values; centralized settings get ``rounds * local_steps`` steps."""

    rounds: int = Field(50, ge=1)
    local_steps: int = Field(10, ge=1)
    local_epochs: float | None = Field(
        None, gt=0, description="passes over a site's rows per round instead of local_steps (needs batch_size)"
    )
    lr: float = Field(0.1, gt=0)
    batch_size: int | None = Field(None, ge=1)
    l2: float = Field(1e-2, ge=0)
    fraction_fit: float = Field(1.0, gt=0, le=1)
    min_sites: int = Field(1, ge=1)
    max_update_norm: float | None = Field(
        None, gt=0, description="the server rejects an upload whose update has a larger L2 norm"
    )
    loss: str = Field("ce", description="classification data term: ce, or the noise-robust gce or sce")
    loss_options: dict[str, Any] = Field(default_factory=dict, description="gce: q in (0, 1]; sce: alpha, beta >= 0")

    @model_validator(mode="after")
    def _loss(self) -> TrainingSpec:
        try:
            self.robust_loss()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    def robust_loss(self) -> RobustLoss | None:
        """The noise-robust loss the models train with (:mod:`medfed.models.losses`), None for ``ce``."""
        return make_loss(self.loss, self.loss_options)


class EvaluationSpec(_Strict):
    """``[evaluation]``: how every setting's scores become predictions. ``threshold``: the
    decision threshold of ACC, SEN, SPE, balanced accuracy and F1 (AUC needs none), ``"0.5"``
    on the probability, or chosen per model and repeat on training rows only: ``"youden"``
    (the largest TPR - FPR) or ``"prevalence"`` (predicted-positive fraction = prevalence);
    where it is chosen: :mod:`medfed.experiments.metrics`."""

    threshold: str = Field("0.5", description="decision threshold: 0.5, youden or prevalence (training rows)")

    @field_validator("threshold", mode="before")
    @classmethod
    def _rule(cls, value: Any) -> Any:
        from medfed.experiments.metrics import THRESHOLD_RULES

        if isinstance(value, int | float) and not isinstance(value, bool) and value == 0.5:
            return "0.5"  # threshold = 0.5 in a TOML file is a number
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in THRESHOLD_RULES:
            raise ValueError(f"{value!r} is not a threshold rule; use {', '.join(THRESHOLD_RULES)}")
        return text


class PipelineSpec(_Strict):
    """A server pipeline listed in a config file: a method of the user's own.

    ``steps``: a reducing step, then update steps (names from ``medfed.methods.steps``), each a
    name or a table ``{step = "name", option = value}``; ``apply_delta`` is added at the end.
    ``client``: the sites' rule: FedAvg's local SGD, FedProx's (with ``mu``), or any client-end
    method whose server is FedAvg's (``semisupervised``, ``vat``, ``distill``, ``fedbn``, ...; its
    options are the pipeline's, under ``[method_options.NAME]``).
    """

    steps: list[str | dict[str, Any]] = Field(min_length=1)
    client: str = "fedavg"
    mu: float = Field(0.1, ge=0)
    display: str | None = None

    _finite = field_validator("steps")(_finite_options)


# Network models learn from mini-batches with Adam; these replace TrainingSpec's defaults and
# the model's (plain SGD) optimizer for them, and values the user sets always win. With SGD at
# these step counts the mni-phantom CNN stays near chance (AUC 0.55-0.59 at lr 0.05-0.2); with
# Adam at lr 0.01 it reaches AUC 0.77-0.85 (measured on 1 repeat, seed 0).
NETWORK_TRAINING_DEFAULTS = {"rounds": 20, "local_steps": 5, "lr": 0.01, "batch_size": 32, "l2": 1e-4}
NETWORK_MODEL_DEFAULTS = {"optimizer": "adam", "threads": 1}


class ExperimentConfig(_Strict):
    data: DataSpec
    model: str = Field("logistic", description="logistic (numpy, tables), torch_logistic, mlp, cnn2d, cnn3d")
    model_options: dict[str, Any] = Field(default_factory=dict)
    methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS), min_length=1)
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    pipelines: dict[str, PipelineSpec] = Field(default_factory=dict)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    repeats: int = Field(5, ge=1)
    seed: int = Field(0, ge=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    scaling: Literal["global", "site", "none"] = "global"
    eval_every: int = Field(0, ge=0)
    loso: bool = Field(False, description="also evaluate each site as unseen: train without it, test on it")
    out: Path | None = None
    overwrite: bool = Field(
        False, description="replace files in `out` that medfed did not write (or that changed since it did)"
    )
    plots: bool = False
    save_model: bool = Field(
        False, description="write repeat 1's model of each setting that has one global model to out/models/<Setting>.npz"
    )
    plot_formats: list[str] = Field(
        default_factory=lambda: ["png"], description="file formats of each plot: png, pdf and/or svg"
    )
    workers: int = Field(1, ge=0, description="repeats run in parallel processes; 1 = serial, 0 = one per core")
    deploy: DeploySpec | None = Field(None, description="the study across hospitals; ignored in simulation")
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    harmonize: HarmonizeSpec = Field(default_factory=HarmonizeSpec)
    compress: str = Field(
        "none", description="upload compression: none, lossless, q8, q4 or topk:FRACTION (with error feedback)")

    @field_validator("compress")
    @classmethod
    def _codec(cls, value: str) -> str:
        from medfed.comm.compress import make_codec

        try:
            make_codec(value)
        except Exception as exc:  # its ConfigError's words, as a validation error of this key
            raise ValueError(str(exc).removeprefix(f"--compress {value!r}: ")) from None
        return value.strip().lower()
    executor: Literal["inprocess", "process", "vectorized", "ray", "flower"] = Field(
        "inprocess",
        description="where sites run: inprocess (serial, this process), process (a process per site, each "
        "owning its rows and state), vectorized (the whole cohort as one array program: numpy models "
        "of every table task with FedAvg/FedProx/FedSGD/SCAFFOLD site rules, torch models with SGD and no "
        "BatchNorm with FedAvg/FedProx), ray (sites as Ray actors, here or on the cluster at "
        "ray_address; pip install 'medfed[scale]'), flower (Flower's deployment runtime: `medfed deploy`)",
    )
    ray_address: str | None = Field(
        None, description="executor ray: the address of a running Ray cluster (None: start Ray on this machine)")
    drop: list[str] = Field(
        default_factory=list,
        description="injected dropouts, SITE@ROUND or SITE@FIRST-LAST (rounds from 1): the site sends nothing then",
    )
    resume: bool = Field(
        False,
        description="checkpoint every federated round under `out` and continue an interrupted run from "
        "its checkpoints (results bit-identical to an uninterrupted run)",
    )
    threads: int | None = Field(
        None, ge=1,
        description="intra-op threads torch models compute with (their model option 'threads', default 1); "
        "the numpy model ignores it",
    )

    _finite = field_validator("model_options", "method_options")(_finite_options)

    @field_validator("out", mode="before")
    @classmethod
    def _named_out(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: give a folder name")  # Path("") would silently be "."
        return value

    @field_validator("plot_formats", mode="before")
    @classmethod
    def _plot_formats(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value:
            raise ValueError(f"give a non-empty list of {', '.join(PLOT_FORMATS)} (--plot-format png,pdf)")
        formats = [f.lower() if isinstance(f, str) else f for f in value]
        bad = [f for f in formats if f not in PLOT_FORMATS]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a plot format; use {', '.join(PLOT_FORMATS)} (--plot-format png,pdf)")
        return list(dict.fromkeys(formats))  # each format once, in the order given

    @model_validator(mode="before")
    @classmethod
    def _network_defaults(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("model", "logistic") != "logistic":
            training = values.get("training")
            given = dict(training) if isinstance(training, dict) else {}
            if isinstance(training, dict) or training is None:
                values = {**values, "training": {**NETWORK_TRAINING_DEFAULTS, **given}}
            options = values.get("model_options")
            if isinstance(options, dict) or options is None:
                options = dict(options or {})
                threads = values.get("threads")
                if threads is not None:
                    # --threads is the torch model's own compute thread count: results are bit-identical
                    # for a given count (see medfed.models.torch_models), so it is one recorded setting
                    if "threads" in options and options["threads"] != threads:
                        raise ValueError(
                            f"threads is {threads!r} but model_options.threads is {options['threads']!r}; give one"
                        )
                    options["threads"] = threads
                values = {**values, "model_options": {**NETWORK_MODEL_DEFAULTS, **options}}
        return values


def _format_validation_error(
    exc: ValidationError, source: str, flag_for: Callable[[str], str | None] | None = None
) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "non_finite":
            loc = f"{loc}.{err['ctx']['key']}"
        msg = err["msg"].removeprefix("Value error, ")  # our validators' own words need no prefix
        if err["type"] == "finite_number":
            msg += f", got {err['input']}"
        flag = flag_for(loc) if flag_for and loc else None
        parts.append(f"{loc or '(top level)'}{f' ({flag})' if flag else ''}: {msg}")
    return f"{source}: " + "; ".join(parts)


def build_config(
    values: dict[str, Any],
    source: str = "configuration",
    flag_for: Callable[[str], str | None] | None = None,
    *,
    schema_only: bool = False,
) -> ExperimentConfig:
    """Validate a plain dict into an :class:`ExperimentConfig` with a one-line error.

    ``flag_for`` maps a config key (``training.lr``) to the command-line flag that sets it
    (``--lr``), so the message names both. ``schema_only``: ``[data]`` may name no source (a
    deployed study, whose sites each bring their own table).
    """
    try:
        return ExperimentConfig.model_validate(values, context={"schema_only": schema_only})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source, flag_for)) from None


def read_toml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory, not a TOML file")
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
            "TOML files are UTF-8: re-save it as UTF-8"
        ) from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    # relative data paths are relative to the config file, as a user writing it expects
    data = values.get("data")
    for key in ("path", "manifest"):
        if isinstance(data, dict) and isinstance(data.get(key), str):
            p = Path(data[key])
            if not p.is_absolute():
                data[key] = str((path.parent / p).resolve())
    if isinstance(data, dict) and isinstance(data.get("npz"), dict):
        data["npz"] = {site: str(p if Path(p).is_absolute() else (path.parent / p).resolve())
                       for site, p in data["npz"].items()}
    return values


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Nested dict update: flags (``overrides``) win over the config file (``base``)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
