"""A trained model as a file, ``models/<Setting>.npz``, and scoring new rows with it.

``medfed run --save-model`` writes one file per setting that yields one global model, from
repeat 1 (:func:`saved_model_file`, called by the harness); ``medfed predict`` reads one
(:func:`load_saved_model`) and scores a table with the same columns (:meth:`SavedModel.score`),
preprocessing each row as the run preprocessed a site's test rows, so that the scores equal
the run's bit for bit.

Format ``medfed-model`` version 1: an npz archive (numpy's zip of ``.npy`` arrays; read with
``allow_pickle=False``) holding

- ``metadata``: JSON text (a 0-d string array), described in :func:`saved_model_file`;
- ``params/<name>``: the parameter view in float64 (``params/weight``, ``params/bias`` for the
  numpy logistic model; ``params/body.0.linear.weight`` ... for a torch model);
- ``scaler/mean``, ``scaler/scale``: the standardization the model applies to every row
  (``scaling = "global"``: the pooled mean and standard deviation of its training sites'
  training rows, assembled from their moments);
- ``site/<i>/impute``: site *i*'s imputation values, the column medians (or means) of its
  training rows (with ``impute``); ``site/<i>/mean``, ``site/<i>/scale``: site *i*'s own
  standardization (``scaling = "site"``); *i* indexes ``sites`` in the metadata.

A file of a multiclass, multilabel, regression or segmentation model carries ``task``,
``classes`` (class or label names, in output order) and, for regression, ``target_scale``
(``mean``, ``std``: the standardization its targets were trained in, which scoring undoes) in
its metadata; a file without ``task`` (written before tasks existed) is a binary model.

About the data it holds what a setup exchange may share: per-column summaries of training
rows and level names, never a row. Every zip entry carries a fixed time stamp, so the same
config and seed write the same bytes.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medfed.data.categorical import CategoricalColumn, keep_training_levels
from medfed.data.preprocess import Imputer, Standardizer
from medfed.data.tasks import TASKS, TargetScale
from medfed.errors import ConfigError, DataError
from medfed.experiments.metrics import DEFAULT_THRESHOLD, HALF, Threshold

if TYPE_CHECKING:
    from medfed.data.federation import Federation
    from medfed.data.tables import ScoringRows
    from medfed.experiments.config import ExperimentConfig

FORMAT = "medfed-model"
FORMAT_VERSION = 1
MODELS_DIR = "models"
MODEL_FILES = (f"{MODELS_DIR}/*.npz",)  # the names a run with --save-model may write in its folder
SAVED_REPEAT = 0  # the repeat whose models are saved (0-based: "repeat 1")
MODEL_ROWS = "model"  # metadata threshold key: chosen on the rows a centralized model was trained on
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


@dataclass(frozen=True)
class SavedModel:
    """What a model file holds: its metadata, its parameter view and its preprocessing arrays
    (by their archive names, ``scaler/...`` and ``site/<i>/...``)."""

    meta: dict[str, Any]
    params: dict[str, np.ndarray]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        entries = {"metadata": np.array(json.dumps(self.meta, indent=1, allow_nan=False))}
        entries.update({f"params/{name}": np.asarray(v, dtype=np.float64) for name, v in self.params.items()})
        entries.update(self.arrays)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, value in entries.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(info, "w") as fh:
                    np.lib.format.write_array(fh, np.asarray(value), allow_pickle=False)
        return buf.getvalue()

    @property
    def sites(self) -> list[str]:
        return list(self.meta["sites"])

    @property
    def is_image(self) -> bool:
        return len(self.meta["sample_shape"]) > 1

    @property
    def task(self) -> str:
        return self.meta.get("task", "binary")

    @property
    def classes(self) -> tuple[str, ...]:
        """The names of a multiclass model's classes or a multilabel model's labels, in output order."""
        return tuple(self.meta.get("classes") or ())

    def check_scorable(self, site: str | None, source: str, images: bool = False) -> None:
        """Refuse, before any data is read, what :meth:`score` (a table) or :meth:`score_images`
        (``images``: a manifest) cannot do: a table model on images or an image model on a table,
        an unknown ``site``, or per-site standardization without ``site``. ``source`` names the file."""
        if self.is_image and not images:
            raise ConfigError(
                f"{source} holds an image model ({self.meta['model']['name']}, {self.task} task, samples of shape "
                f"{tuple(self.meta['sample_shape'])}): give its images as a manifest (--manifest FILE), not --data"
            )
        if images and not self.is_image:
            raise ConfigError(f"{source} holds a model of feature tables ({self.meta['model']['name']}, "
                              f"{len(self.meta['feature_names'])} features): give a table (--data FILE), not --manifest")
        if site is not None and site not in self.sites:
            raise ConfigError(f"--site {site!r}: {source} has no such site; its sites: {', '.join(self.sites)}")
        if site is None and self.meta["scaling"] == "site":
            raise ConfigError(
                f"{source} standardizes each site's rows with that site's own statistics (--scaling site): "
                f"pass --site NAME, one of {', '.join(self.sites)}"
            )
        if self.task == "binary":
            self.threshold(site, source)

    def threshold(self, site: str | None, source: str = "the model") -> Threshold:
        """The decision threshold ``predicted`` applies: the run's rule as it chose it for this
        model (a file written before rules existed: 0.5); a federated model's was chosen on each
        site's own training rows, so ``site`` says whose. Refused where there is none to apply."""
        t = self.meta.get("threshold")
        if t is None or t["rule"] == DEFAULT_THRESHOLD:
            return HALF
        logits = t["logit"]
        if MODEL_ROWS not in logits and site is None:
            raise ConfigError(f"{source}'s decision threshold ({t['rule']}) was chosen on each site's own training "
                              f"rows: pass --site NAME, one of {', '.join(logits)}")
        key = MODEL_ROWS if MODEL_ROWS in logits else site
        if key not in logits or logits[key] is None:
            raise ConfigError(f"{source} has no {t['rule']} decision threshold for "
                              f"{'its training rows' if key == MODEL_ROWS else f'site {site!r}'}: "
                              f"{t['reasons'].get(key, 'the site took no part in training')}")
        return Threshold(t["rule"], float(logits[key]))

    @property
    def categorical(self) -> tuple[CategoricalColumn, ...]:
        return tuple(CategoricalColumn(c["column"], tuple(c["levels"]), int(c["start"])) for c in self.meta["categorical"])

    def score(self, rows: ScoringRows, site: str | None = None, source: str = "the model",
              data: str = "the rows") -> Scored:
        """Each row's probability of the positive class (binary), of each class (multiclass) or
        label (multilabel), or its predicted value on the target's own scale (regression),
        preprocessed as the run preprocessed the test rows of ``site`` (prepare_repeat, then the
        model's standardization), and computed as the run scored them. ``source`` and ``data``
        name the model file and the table in messages."""
        self.check_scorable(site, source)
        columns = self.categorical
        known = {c["column"]: np.isin(c["levels"], c["trained"]) for c in self.meta["categorical"]}
        X, unseen = keep_training_levels(rows.X, columns, known)
        for column, levels in rows.new_levels.items():
            unseen.setdefault(column, {}).update(levels)
        missing = np.isnan(X)
        if missing.any():  # read_scoring_rows refused missing values for a model without imputation
            if site is None:
                first = self.meta["feature_names"][int(np.argmax(missing.any(axis=0)))]
                raise ConfigError(
                    f"{data} has {int(missing.sum())} missing values (first in column {first!r}); {source} fills "
                    f"them with a training site's {self.meta['impute']}s: pass --site NAME, one of {', '.join(self.sites)}"
                )
            X = Imputer(self.meta["impute"], self.arrays[_site_key(self.sites.index(site), "impute")])(X)
        scores, predicted = self._predict(self._standardize(X, site), site, source)
        return Scored(scores, unseen, int(missing.sum()), predicted)

    def score_images(self, X: np.ndarray, site: str | None = None, source: str = "the model") -> Scored:
        """:meth:`score` for images ``(n, C, *spatial)`` float32 as a site holds them (read by
        :func:`medfed.data.images.load.read_image_rows`): standardized per channel as the run
        standardized the test images, then scored as it scored them; a segmentation model's
        scores are per-pixel class probabilities ``(n, K, *spatial)`` and ``predicted`` each
        pixel's most probable class (the metrics' rule)."""
        self.check_scorable(site, source, images=True)
        scores, predicted = self._predict(self._standardize(X, site), site, source)
        return Scored(scores, {}, 0, predicted)

    def _standardize(self, X: np.ndarray, site: str | None) -> np.ndarray:
        """The model's standardization (prepare_site's per-site one, or ScaledViews' global one)."""
        if self.meta["scaling"] == "site":
            i = self.sites.index(site)
            return Standardizer(self.arrays[_site_key(i, "mean")], self.arrays[_site_key(i, "scale")])(X)
        if self.meta["scaling"] == "global":
            return Standardizer(self.arrays["scaler/mean"], self.arrays["scaler/scale"])(X)
        return X

    def _predict(self, X: np.ndarray, site: str | None, source: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores and predictions of standardized ``X``, as harness.run_repeat scores a test site."""
        model = self.model()
        if self.task == "binary":
            scores = model.predict_proba(self.params, X)
            predicted = self.threshold(site, source).predict(scores, model.decision(self.params, X))
        else:  # metrics.task_scores, mapped back for regression
            scores = model.predict(self.params, X)
            predicted = None
            if self.task in ("multiclass", "segmentation"):
                predicted = np.argmax(scores, axis=1)  # the metrics' rule: the first class on ties
            elif self.task == "regression":
                t = self.meta["target_scale"]
                scores = TargetScale(float(t["mean"]), float(t["std"])).inverse(scores)
        return np.asarray(scores, dtype=np.float64), predicted

    def model(self):
        """The model object (numpy GLM, or a torch model: torch is imported here) for the file's task."""
        from medfed.models.registry import make_model

        spec = self.meta["model"]
        return make_model(spec["name"], tuple(self.meta["sample_shape"]), task=self.task,
                          n_classes=len(self.classes) or None, **spec["options"])


@dataclass(frozen=True)
class Scored:
    """What scoring rows gave: the scores, the categorical levels no training site held (column
    -> level -> rows, encoded as all-zero indicators) and how many missing values were filled."""

    scores: np.ndarray  # (n,): binary, regression; (n, K): multiclass, multilabel; (n, K, *spatial): segmentation
    unseen_levels: dict[str, dict[str, int]]
    imputed: int
    # binary: True where the row is predicted positive (SavedModel.threshold); multiclass: the
    # predicted class index (segmentation: per pixel); None for multilabel and regression
    predicted: np.ndarray | None


def _site_key(i: int, what: str) -> str:
    return f"site/{i}/{what}"


def saved_model_file(
    config: ExperimentConfig,
    federation: Federation,
    sites: Sequence,
    scaler: Standardizer,
    params: Mapping[str, np.ndarray],
    *,
    setting: str,
    method: str,
    train_sites: Sequence[str],
    settings: Sequence[str],
    personal: bool = False,
    thresholds: Mapping[str, Threshold] | None = None,
    target: TargetScale | None = None,
) -> SavedModel:
    """The file of one trained model of repeat 1.

    ``sites`` are that repeat's split sites (``harness.SplitSite``: their imputers, site
    scalers and the categorical levels training rows held); ``scaler`` is the model's own
    standardization (``harness.ScaledViews.scaler``). Metadata: medfed's version; ``setting``
    (display name), ``method``, ``settings`` (every setting of the run whose rows this model
    scored: Single and Cross share one per-site model); ``dataset``, ``train_sites``, ``seed``,
    ``repeat`` (1) of ``repeats``; ``model`` (name, options); ``sample_shape``,
    ``feature_names``, ``categorical`` (column, levels, first indicator, levels that training
    rows held); ``label`` (column, the positive value, what the positive class means);
    ``impute``, ``scaling``, ``sites``; ``parameters`` (names, in order); ``threshold``: the
    run's rule and the decision threshold it chose for this model on the logit scale, by
    training site (a federated model: each site's own rows) or as ``"model"`` (the rows a
    centralized model was trained on), from ``thresholds`` (default: 0.5), None for other tasks;
    ``task`` and ``classes``; ``target_scale`` (regression): ``target``'s mean and std.
    """
    from medfed import __version__

    info = federation.info
    table = "label_column" in info and not federation.is_image  # embedded data sets have no label column
    task = getattr(federation, "task", "binary")
    binary = task == "binary"
    repeats = config.repeats
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medfed_version": __version__,
        "setting": setting,
        "method": method,
        "settings": list(settings),
        "dataset": federation.name,
        "train_sites": list(train_sites),
        "seed": config.seed,
        "repeat": SAVED_REPEAT + 1,
        "repeats": repeats,
        "note": (f"the model of repeat 1 of {repeats}; each repeat trains its own on another split, and the "
                 f"results average all {repeats}") if repeats > 1 else "the model of the run's only repeat",
        "model": {"name": config.model, "options": dict(config.model_options)},
        "sample_shape": list(federation.sample_shape),
        "feature_names": list(federation.feature_names),
        "categorical": [
            {"column": c.name, "levels": list(c.levels), "start": c.start,
             "trained": [lv for lv, held in zip(c.levels, sites[0].known_levels[c.name]) if held]}
            for c in federation.categorical
        ],
        "label": {
            "column": info.get("label_column") if table else None,
            "positive_label": (federation.positive_label if table else "1") if binary else None,
            "positive_class": federation.positive_label if binary else None,
        },
        "impute": None if federation.is_image else federation.impute,
        "scaling": config.scaling,
        "sites": [s.name for s in sites],
        "parameters": list(params),
        "threshold": _threshold_meta(thresholds or {MODEL_ROWS: HALF}) if binary else None,
        "task": task,
        "classes": list(getattr(federation, "classes", ())),
    }
    if task == "regression":
        meta["target_scale"] = {"mean": target.mean, "std": target.std}
    if personal:
        meta["personal_models"] = "each site's personal model stays at the site; this file is the global model"
    arrays: dict[str, np.ndarray] = {}
    if config.scaling == "global":
        arrays["scaler/mean"], arrays["scaler/scale"] = scaler.mean, scaler.scale
    for i, s in enumerate(sites):
        if meta["impute"] is not None:
            arrays[_site_key(i, "impute")] = s.imputer.values
        if config.scaling == "site":
            arrays[_site_key(i, "mean")], arrays[_site_key(i, "scale")] = s.scaler.mean, s.scaler.scale
    return SavedModel(meta, {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}, arrays)


def _threshold_meta(thresholds: Mapping[str, Threshold]) -> dict[str, Any]:
    rule = next(iter(thresholds.values())).rule
    return {"rule": rule, "logit": {k: t.logit for k, t in thresholds.items()},
            "reasons": {k: t.reason for k, t in thresholds.items() if t.reason}}


def _corrupt(path: Path, what: str) -> DataError:
    return DataError(f"{path} is not a usable medfed model file: {what}")


def load_saved_model(path: str | Path) -> SavedModel:
    """Read a model file; anything else (no file, a folder, another format, a damaged or newer
    file) is one :class:`DataError` naming the path."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"model file {path} is a folder; give a file that medfed run --save-model wrote "
                        f"({MODELS_DIR}/<Setting>.npz)")
    if not path.exists():
        raise DataError(f"model file not found: {path}")
    try:
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path} is not a medfed model file (not an npz archive); medfed run --save-model "
                            f"writes them as {MODELS_DIR}/<Setting>.npz")
        with np.load(path, allow_pickle=False) as archive:
            if "metadata" not in archive.files:
                raise _corrupt(path, "an npz archive without medfed's metadata entry")
            meta = json.loads(str(archive["metadata"][()]))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise _corrupt(path, f"its metadata is not of the {FORMAT!r} format")
            version = meta.get("format_version")
            if not isinstance(version, int) or version > FORMAT_VERSION:
                raise _corrupt(path, f"format version {version!r}; this medfed reads version {FORMAT_VERSION} "
                                     f"(written by medfed {meta.get('medfed_version')})")
            names = meta.get("parameters")
            if not isinstance(names, list) or not names:
                raise _corrupt(path, "its metadata lists no parameters")
            absent = [n for n in names if f"params/{n}" not in archive.files]
            if absent:
                raise _corrupt(path, f"parameter {absent[0]!r} is missing")
            params = {n: archive[f"params/{n}"] for n in names}
            arrays = {k: archive[k] for k in archive.files if k != "metadata" and not k.startswith("params/")}
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    model = SavedModel(meta, params, arrays)
    _check_consistent(model, path)
    return model


def _check_consistent(model: SavedModel, path: Path) -> None:
    """The metadata keys scoring reads, and the arrays they imply, are there."""
    meta = model.meta
    for key, kind in (("model", dict), ("sample_shape", list), ("feature_names", list), ("categorical", list),
                      ("label", dict), ("scaling", str), ("sites", list), ("setting", str)):
        if not isinstance(meta.get(key), kind):
            raise _corrupt(path, f"metadata field {key!r} is missing or not a {kind.__name__}")
    if meta["scaling"] not in ("global", "site", "none") or meta.get("impute") not in (None, "mean", "median"):
        raise _corrupt(path, f"scaling {meta['scaling']!r} or impute {meta.get('impute')!r} is not medfed's")
    task, classes = meta.get("task", "binary"), meta.get("classes", [])
    if task not in TASKS or not isinstance(classes, list) or (task in ("multiclass", "multilabel") and not classes):
        raise _corrupt(path, f"task {task!r} with classes {classes!r} is not medfed's")
    if task == "regression":
        t = meta.get("target_scale")
        if not (isinstance(t, dict) and all(isinstance(t.get(k), (int, float)) and np.isfinite(t[k])
                                            for k in ("mean", "std"))):
            raise _corrupt(path, "a regression model without a finite target_scale (mean, std)")
    needed = ["scaler/mean", "scaler/scale"] if meta["scaling"] == "global" else []
    for i in range(len(meta["sites"])):
        needed += [_site_key(i, "impute")] * (meta.get("impute") is not None)
        needed += [_site_key(i, w) for w in ("mean", "scale")] * (meta["scaling"] == "site")
    absent = [k for k in needed if k not in model.arrays]
    if absent:
        raise _corrupt(path, f"array {absent[0]!r} is missing")
    if not all(np.isfinite(v).all() for v in (*model.params.values(), *model.arrays.values())):
        raise _corrupt(path, "it holds NaN or infinite values")


# --------------------------------------------------------------------------- a distilling method's teacher

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # a torch state dict (torch.save of a module's state_dict())
TEACHER_TASKS = ("binary", "multiclass")
SKIPPED_BUFFERS = ("num_batches_tracked",)  # BatchNorm's step counter: not in medfed's parameter view


def is_state_dict(path: str | Path) -> bool:
    """Whether a teacher file is read as a torch state dict (by its suffix) rather than a model file."""
    return Path(path).suffix.lower() in TORCH_SUFFIXES


def _teacher_file(path: Path) -> SavedModel:
    """The model file a teacher comes from, or one ConfigError naming the file and what a teacher may be."""
    saved = load_saved_model(path)
    if saved.task not in TEACHER_TASKS:
        raise ConfigError(f"--teacher {path} holds a {saved.task} model; a teacher is a binary or multiclass "
                          f"classifier: give a file medfed run --save-model wrote ({MODELS_DIR}/<Setting>.npz) of one, "
                          f"or a torch state dict ({', '.join(TORCH_SUFFIXES)})")
    return saved


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A torch state dict file as float64 arrays by name (``torch.load(weights_only=True)``: tensors
    only, no code runs), BatchNorm's step counters left out; one ConfigError naming the file otherwise."""
    try:
        import torch
    except ImportError:
        from medfed.data.extras import missing_extra

        raise ConfigError(missing_extra("torch", f"--teacher {path} (a torch state dict)")) from None
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--teacher {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or non-torch file: torch's own reason, in one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--teacher {path} is not a torch state dict torch.load can read ({reason})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--teacher {path} holds no state dict (a mapping of parameter names to tensors, "
                          "as torch.save(module.state_dict(), path) writes)")
    return {str(k): v.detach().double().numpy() for k, v in state.items() if not str(k).endswith(SKIPPED_BUFFERS)}


def check_state_dict(path: str | Path, params: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]],
                     model: str) -> None:
    """One ConfigError naming the file, the first key that does not fit ``model``'s parameter view
    (``shapes``, in order) and the shape it expects, when the state dict ``params`` does not load into it."""
    for key, shape in shapes.items():
        if key not in params:
            raise ConfigError(f"--teacher {path} does not fit the study's model {model!r}: it lacks {key!r} "
                              f"(expected shape {tuple(shape)})")
        if tuple(params[key].shape) != tuple(shape):
            raise ConfigError(f"--teacher {path} does not fit the study's model {model!r}: {key!r} has shape "
                              f"{tuple(params[key].shape)}, expected {tuple(shape)}")
    extra = [k for k in params if k not in shapes]
    if extra:
        raise ConfigError(f"--teacher {path} does not fit the study's model {model!r}: unexpected key {extra[0]!r} "
                          f"(its parameters: {', '.join(list(shapes)[:4])}{', ...' if len(shapes) > 4 else ''})")


def load_teacher(path: str | Path):
    """The teacher a distilling method's sites score their rows with (:class:`medfed.client.distill.Teacher`)
    from a binary or multiclass model file ``medfed run --save-model`` wrote (numpy or torch), or from a
    torch state dict (its model None: the sites load it into the student's architecture); a bad file
    or another task is one ConfigError naming the file."""
    from medfed.client.distill import Teacher

    if is_state_dict(path):
        return Teacher(None, read_state_dict(path), str(path))
    saved = _teacher_file(Path(path))
    return Teacher(saved.model(), saved.params, str(path))


def check_teacher(path: str | Path, federation: Federation) -> None:
    """Refuse, before training, a teacher whose features, sample shape, task or classes differ from
    the study's data, in one ConfigError naming the file and what differs (a model file; a state
    dict is checked against the student's model, :func:`check_state_dict`)."""
    saved = _teacher_file(Path(path))
    ours = {"features": list(federation.feature_names), "sample shape": list(federation.sample_shape),
            "task": federation.task, "classes": [str(c) for c in getattr(federation, "classes", ())]}
    theirs = {"features": list(saved.meta["feature_names"]), "sample shape": list(saved.meta["sample_shape"]),
              "task": saved.task, "classes": [str(c) for c in saved.classes]}
    if federation.task == "binary":
        ours.pop("classes"), theirs.pop("classes")
    for what in ours:
        if ours[what] != theirs[what]:
            mine, its = ours[what], theirs[what]
            if what == "features":
                extra, lacking = [c for c in its if c not in mine], [c for c in mine if c not in its]
                detail = (f"{its}, the data's {mine}" if not (extra or lacking) else  # same columns, another order
                          f"{len(its)} columns, {extra[:3]} not in the data" if extra else
                          f"{len(its)} columns, without the data's {lacking[:3]}")
            else:
                detail = f"{its}, the data {mine}"
            raise ConfigError(f"--teacher {path} does not fit these data: its {what} are {detail}; "
                              "give a model trained on the same columns and targets")


# --------------------------------------------------------------------------- a run's model files


@dataclass
class ModelOutcome:
    """One setting's model of repeat 1, or why the setting has none (``reason``)."""

    name: str  # the setting's display name; "Single-<site>" for a model trained on one site
    model: SavedModel | None
    reason: str | None = None
    file: str | None = None  # "models/<name>.npz" (made safe as a file name), set by name_files


def _stem(name: str) -> str:
    """A display or site name as a file name: letters, digits, '.', '_' and '-' only, no leading dot."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "model"


def _unique_stems(stems: Sequence[str]) -> list[str]:
    """``stems`` made file-name safe (:func:`_stem`), the second and later of a name (compared
    case-insensitively, for case-insensitive file systems) suffixed -2, -3."""
    taken: set[str] = set()
    unique = []
    for name in stems:
        stem, n = _stem(name), 1
        while (stem if n == 1 else f"{stem}-{n}").lower() in taken:
            n += 1
        stem = stem if n == 1 else f"{stem}-{n}"
        taken.add(stem.lower())
        unique.append(stem)
    return unique


def name_files(outcomes: Sequence[ModelOutcome]) -> None:
    """Give every saved model its file name; two names made alike by :func:`_stem` get -2, -3."""
    saved = [o for o in outcomes if o.model is not None]
    for o, stem in zip(saved, _unique_stems([o.name for o in saved])):
        o.file = f"{MODELS_DIR}/{stem}.npz"


def models_document(outcomes: Sequence[ModelOutcome], config: ExperimentConfig) -> dict[str, Any]:
    """``results.json``'s ``models``: which file holds which setting's model, and why the others have none."""
    notes = []
    if config.loso:
        notes.append("leave-one-site-out models (one per held-out site) are not saved")
    if config.repeats > 1:
        notes.append(f"each file holds repeat 1's model; the results average {config.repeats} repeats")
    return {
        "repeat": SAVED_REPEAT + 1,
        "repeats": config.repeats,
        "files": {o.name: o.file for o in outcomes if o.model is not None},
        "not_saved": {o.name: o.reason for o in outcomes if o.model is None},
        "notes": notes,
    }


def model_lines(doc: dict[str, Any]) -> list[str]:
    """What the report says about the model files (empty without --save-model)."""
    models = doc.get("models")
    if not models:
        return []
    lines = []
    if models["files"]:
        lines.append(f"saved (repeat {models['repeat']} of {models['repeats']}): {', '.join(models['files'].values())}")
    lines += [f"no file for {name}: {reason}" for name, reason in models["not_saved"].items()]
    return lines + list(models["notes"])


# --------------------------------------------------------------------------- predictions

def prediction_columns(task: str, classes: Sequence[str]) -> list[str]:
    """The columns :func:`predictions_csv` writes after ``row`` and the id column."""
    if task == "binary":
        return ["score", "predicted"]
    if task == "regression":
        return ["predicted"]
    return [f"score:{c}" for c in classes] + (["predicted"] if task == "multiclass" else [])


def predictions_csv(scored: Scored, model: SavedModel, ids: Sequence[str] | None = None,
                    id_column: str | None = None) -> bytes:
    """``row`` (the data row, 1-based as in medfed's messages), the id column when given, then
    (:func:`prediction_columns`, every number with every digit: it reads back as the same float)
    binary: ``score`` (probability of the positive class) and ``predicted`` (1 where the model's
    decision threshold calls the row positive); multiclass: ``score:<class>`` per class and
    ``predicted`` (the most probable class's name); multilabel: ``score:<label>`` per label;
    regression: ``predicted`` (the value, on the target's own scale)."""
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["row", *([id_column] if ids is not None else []), *prediction_columns(model.task, model.classes)])
    for i, values in enumerate(_prediction_cells(scored, model)):
        writer.writerow([i + 1, *([ids[i]] if ids is not None else []), *values])
    return buf.getvalue().encode()


def _prediction_cells(scored: Scored, model: SavedModel) -> list[list]:
    """Each row's :func:`prediction_columns` cells (not for segmentation: its files are the prediction)."""
    task, classes = model.task, model.classes
    scores = scored.scores.reshape(len(scored.scores), -1).tolist()
    predicted = [] if scored.predicted is None else scored.predicted.tolist()
    cells = []
    for i, row in enumerate(scores):
        values = [repr(v) for v in row]
        if task == "binary":
            values.append(int(predicted[i]))
        elif task == "multiclass":
            values.append(classes[predicted[i]])
        cells.append(values)
    return cells


# --------------------------------------------------------------------------- predictions for images

MASK_ENDING = "_mask"  # <image stem>_mask.nii.gz / .png


def mask_values(model: SavedModel) -> np.ndarray:
    """The stored mask value of each class of a segmentation model (``background`` is 0, the
    others are named by their value: data.images.load)."""
    return np.array([0, *(int(c) for c in model.classes[1:])], dtype=np.int64)


def mask_classes(model: SavedModel, masks: np.ndarray, paths: Sequence[Path], source: str) -> np.ndarray:
    """True masks' stored values as the model's class indices; a value the training masks never
    held is one DataError naming the mask file."""
    values = mask_values(model)
    for mask, path in zip(masks, paths):
        odd = np.setdiff1d(np.unique(mask), values)
        if odd.size:
            raise DataError(f"{path}: mask value {int(odd[0])} is none of the classes {source} was trained on; "
                            f"allowed: {', '.join(map(str, values.tolist()))}")
    return np.searchsorted(values, masks)


def mask_file_names(images: Sequence[Path], folder: str, suffix: str) -> list[str]:
    """``<folder>/<image stem>_mask<suffix>`` for each image, in manifest order; two stems made
    alike (case-insensitively: ``a/T1.nii.gz`` and ``b/t1.nii.gz``) get ``-2``, ``-3``."""
    from medfed.data.images.masks import image_stem

    return [f"{folder}/{stem}{MASK_ENDING}{suffix}" for stem in _unique_stems([image_stem(p) for p in images])]


def image_prediction_columns(model: SavedModel, with_truth: bool) -> list[str]:
    """The columns :func:`image_predictions_csv` writes after ``row`` and ``path``."""
    if model.task != "segmentation":
        return prediction_columns(model.task, model.classes)
    columns = ["mask", *(f"voxels:{c}" for c in model.classes)]
    if with_truth:
        foreground = model.classes[1:]
        columns += ["dice", "iou", "hd95", *(f"dice:{c}" for c in foreground), *(f"iou:{c}" for c in foreground)]
    return columns


def image_predictions_csv(scored: Scored, model: SavedModel, images: Sequence[Path],
                          mask_files: Sequence[str] | None = None, truth: np.ndarray | None = None) -> bytes:
    """``row`` (1-based manifest row), ``path`` (the image, as the manifest resolves it), then
    (:func:`image_prediction_columns`) a classification or regression model's columns as for a
    table (:func:`predictions_csv`), or a segmentation model's ``mask`` (the predicted mask file,
    relative to the CSV's folder), ``voxels:<class>`` (voxels predicted each class) and, with
    ``truth`` (class indices of the manifest's masks), the image's Dice, IoU and HD95 as the run's
    metrics compute them for one image (``metrics.segmentation_metrics``; empty where undefined:
    the true mask holds none of the class)."""
    import csv

    from medfed.experiments.metrics import segmentation_metrics

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = image_prediction_columns(model, truth is not None)
    writer.writerow(["row", "path", *columns])
    if model.task != "segmentation":
        for i, values in enumerate(_prediction_cells(scored, model)):
            writer.writerow([i + 1, str(images[i]), *values])
        return buf.getvalue().encode()
    K = len(model.classes)
    for i, predicted in enumerate(scored.predicted):
        values = [mask_files[i], *np.bincount(predicted.ravel(), minlength=K).tolist()]
        if truth is not None:
            metrics = segmentation_metrics(truth[i:i + 1], scored.scores[i:i + 1], model.classes)
            values += ["" if metrics[c].value is None else repr(float(metrics[c].value)) for c in columns[1 + K:]]
        writer.writerow([i + 1, str(images[i]), *values])
    return buf.getvalue().encode()
