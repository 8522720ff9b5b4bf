"""A hospital's side of a deployed study: answer the coordinator's requests from the site's
own file and its own folder.

Flower starts a ClientApp process per message, so nothing lives in memory between requests:
the site folder holds the study the coordinator sent at setup (``study.json``), the site's
prepared rows (``rows.npz``: split, imputed and, with ``[harmonize]``, adjusted by the
federation's fit from ``raw.npz``; with the training rows whose label cell is empty, or holds
the study's ``unlabeled_value``, as ``X_unlabeled``, prepared as in simulation; never sent
anywhere) and, per method run,
the :class:`~medfed.engine.runtime.SiteRuntime`'s state (``runs/<run>/``), written
atomically. Every request is :mod:`medfed.comm.wire` bytes (never pickle) and every answer
too; a request the site cannot serve is answered with ``{"error": one line}``, which the
coordinator records as the site's reason for the round.

What leaves the site: before setup, the task its labels read as and the class names it holds
(``labels``: never a row's label); at setup, its row counts (all rows; training rows per class; unlabeled training rows), the
column moments of its training rows (count, sums, sums of squares: global scaling), its
imputation values (training-row medians or means) and its feature names; with ``[harmonize]``,
the statistics of its training rows that the fit needs (:mod:`medfed.experiments.harmonization`:
ComBat's design cross-products, then its residual moments; or its images' mean low-band
amplitudes), after which it adjusts its own rows by its share of the fit and shares their
moments; each round, its upload; at the end, its test metrics. Never a row.

A distilling method's ``teacher`` is a path each site resolves on its own machine: an absolute
path as it is, a relative one against the directory ``medfed deploy site`` was started in (the
node config's ``workdir``); a site without that file, or with one that does not fit its data,
stops the study at setup, by name. The coordinator never reads it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.atomic import write_bytes_atomically
from medfed.client.drift import label_counts
from medfed.client.local import LocalData
from medfed.comm.compress import make_codec
from medfed.comm.wire import decode, encode
# the harmonization exchange's wire types: a fresh ClientApp process must know them before it decodes a request
from medfed.data.frequency import FrequencyModel
from medfed.data.harmonize import CombatLocation, CombatModel, SiteRows, residual_stats
from medfed.data.preprocess import Moments, Standardizer
from medfed.data.tasks import UNSCALED, TargetScale
from medfed.engine.executors.remote import plan_of
from medfed.engine.protocol import SiteProgram
from medfed.engine.runtime import SiteRuntime
from medfed.errors import ConfigError, DataError, MedfedError
from medfed.rng import KeyedRng

STUDY_FILE, ROWS_FILE, RAW_FILE = "study.json", "rows.npz", "raw.npz"


@dataclass(frozen=True)
class SiteIdentity:
    """Who this site is and where its data and folder are (the SuperNode's node config), and the
    directory a relative path of the study resolves against at this site (``workdir``: where
    ``medfed deploy site`` was started; the process's own working directory when the node config
    has none, as in a loopback dry run)."""

    name: str
    data: Path
    folder: Path
    workdir: Path = Path()

    @classmethod
    def of(cls, node_config: Mapping[str, Any]) -> SiteIdentity:
        missing = [k for k in ("site", "data", "folder") if not node_config.get(k)]
        if missing:
            raise ConfigError(f"the site's node config lacks {', '.join(missing)}; start it with `medfed deploy site`")
        return cls(str(node_config["site"]), Path(str(node_config["data"])), Path(str(node_config["folder"])),
                   Path(str(node_config.get("workdir") or Path.cwd())))

    def local_path(self, given: str) -> Path:
        """A path the study names (a distilling method's ``teacher``) on this site's machine."""
        path = Path(given).expanduser()
        return path if path.is_absolute() else self.workdir / path


def handle(payload: bytes, node_config: Mapping[str, Any]) -> bytes:
    """One request in, one answer out; a failure the site can explain is an answer too."""
    try:
        site = SiteIdentity.of(node_config)
        request = decode(payload, "the coordinator's request")
        if not isinstance(request, Mapping) or request.get("op") not in _OPS:
            raise DataError(f"the coordinator's request names no known operation ({', '.join(_OPS)})")
        answer = _OPS[request["op"]](site, request)
    except MedfedError as exc:
        answer = {"error": str(exc)}
    return encode(answer)


# -- setup ---------------------------------------------------------------------------------------


def _study(site: SiteIdentity, request: Mapping[str, Any]):
    """The study the coordinator sent, checked: the same medfed version, and this site among its sites."""
    from medfed import __version__
    from medfed.deploy.study import study_from_payload

    theirs = request.get("medfed_version")
    if theirs != __version__:
        raise ConfigError(f"site {site.name!r} runs medfed {__version__}, the coordinator medfed {theirs}: "
                          "both must run the same version (the study's numbers depend on it)")
    config = study_from_payload(dict(request["study"]))
    names = list(config.deploy.sites)
    if site.name not in names:
        raise ConfigError(f"site {site.name!r} is not in the study's [deploy] sites ({', '.join(names)})")
    return config


def _labels(site: SiteIdentity, request: Mapping[str, Any]) -> dict[str, Any]:
    """What the site's file says its targets are: the task (the study's, or inferred from the
    site's own labels, and why) and the class names it holds, from which the coordinator agrees
    on the federation's classes before setup (:func:`medfed.data.tasks.merged_classes`)."""
    fed = _own_federation(site, _study(site, request))
    return {"site": site.name, "task": fed.task, "task_source": fed.task_source, "classes": list(fed.classes)}


def _on_classes(fed, task: str, classes: tuple[str, ...]):
    """The site's one-site federation with its labels coded against the federation's agreed
    ``classes`` (it may lack some, which is legal and reported), or a DataError when its file
    reads as another task or holds a class the agreement lacks."""
    import dataclasses

    if fed.task != task:
        raise DataError(f"site {fed.sites[0].name!r}: its labels read as a {fed.task} task ({fed.task_source}); "
                        f"the federation agreed on {task}")
    if task not in ("multiclass", "segmentation") or fed.classes == classes:
        return fed
    unknown = [c for c in fed.classes if c not in classes]
    if unknown:
        raise DataError(f"site {fed.sites[0].name!r}: class {unknown[0]!r} is not among the federation's classes "
                        f"({', '.join(classes)})")
    index = np.array([classes.index(c) for c in fed.classes], dtype=np.int64)
    own = fed.sites[0]
    return dataclasses.replace(fed, sites=(dataclasses.replace(own, y=index[own.y]),), classes=classes)


def _setup(site: SiteIdentity, request: Mapping[str, Any]) -> dict[str, Any]:
    """Check the site's file against the study's schema, code its labels against the
    federation's classes, split and impute it, keep the result in the site folder, and share
    the counts and moments the federation may know."""
    from medfed.experiments.harness import prepare_site, training_rows

    config = _study(site, request)
    names = list(config.deploy.sites)
    fed = _own_federation(site, config)
    if "task" in request:  # agreed from every site's labels (_labels); a binary study needs no agreement
        fed = _on_classes(fed, str(request["task"]), tuple(str(c) for c in request["classes"]))
    harmonizing = config.harmonize.method != "none"
    if harmonizing:
        from medfed.experiments.harmonization import check_harmonized_data

        check_harmonized_data(config, fed)
    own = fed.sites[0]
    split = prepare_site(own, training_rows(own, names.index(site.name), config, 0), fed, config)
    write_bytes_atomically(site.folder / STUDY_FILE, json.dumps(request["study"]).encode())
    rows = {"X_train": split.X_train, "y_train": split.y_train, "X_test": split.X_test, "y_test": split.y_test}
    if harmonizing:  # the rows train once the federation's fit has adjusted them (_harmonize)
        (site.folder / ROWS_FILE).unlink(missing_ok=True)
        _write_rows(site.folder / RAW_FILE, **rows, C_train=split.C_train, C_test=split.C_test,
                    features=np.asarray(fed.feature_names, dtype=str))
    else:  # with the training rows without a target, imputed and scaled as X_train by prepare_site (never in the
        # moments, as in simulation); only a method learning from unlabeled rows reads them ([harmonize] refuses those)
        _write_rows(site.folder / ROWS_FILE, **rows, X_unlabeled=split.X_unlabeled)
    m = split.moments
    answer = {
        "imputer": None if split.imputer is None else {"strategy": split.imputer.strategy, "values": split.imputer.values},
        "site_scaler": None if split.scaler is None else {"mean": split.scaler.mean, "scale": split.scaler.scale},
        "site": site.name,
        "summary": fed.site_summaries()[0],
        # K counts for K classes (FedSLD's prior needs a 0 for a class the site lacks); 2 otherwise
        "train_label_counts": tuple(float(c) for c in label_counts(
            split.y_train, fed.n_classes if fed.task == "multiclass" else 2)),
        "moments": {"n": int(m.n), "total": m.total, "total_sq": m.total_sq},
        "unlabeled_rows": len(split.X_unlabeled),  # a count, reported as medfed run reports it
        "teacher_problem": _teacher_problem(site, config, fed),
        # a regression target's n, sum y, sum y^2 (the coordinator pools them into the target scale)
        "target_moments": None if split.target_moments is None else {
            "n": int(split.target_moments.n), "total": split.target_moments.total,
            "total_sq": split.target_moments.total_sq},
        "features": list(fed.feature_names),
        "sample_shape": list(fed.sample_shape),
        "positive_label": fed.positive_label,
        "task": fed.task,
        "task_source": fed.task_source,
        "classes": list(fed.classes),
        "predefined_split": fed.has_predefined_split,
        "is_image": fed.is_image,
        "data_info": fed.info,
    }
    if harmonizing:
        from medfed.experiments.harmonization import first_statistics

        answer["harmonize"] = first_statistics(config, split, fed.feature_names)
    return answer


def _teacher_problem(site: SiteIdentity, config, fed) -> str | None:
    """Every distilling method's teacher, on this site's machine: the file its ``teacher`` option
    names (relative to the site's ``workdir``) exists and fits the site's data (features, task,
    classes; a torch state dict, the study's model); otherwise one line naming the site and the
    path, on which the coordinator stops the study before training (a site that cannot distill is
    not simply left out, as a site whose file fails the schema is: the teacher is the study's, each
    site must have it)."""
    from medfed.experiments.harness import check_teacher_fit
    from medfed.methods import resolve_methods

    for spec, opts in resolve_methods(config.methods, config.method_options, config.pipelines):
        if not opts.get("teacher"):
            continue
        path = site.local_path(str(opts["teacher"]))
        if not path.is_file():
            return (f"site {site.name!r}: method {spec.name!r}'s teacher file {str(path)!r} does not exist "
                    f"(option teacher = {opts['teacher']!r}, resolved against the site's directory {str(site.workdir)!r})")
        try:
            check_teacher_fit(path, config, fed)
        except MedfedError as exc:  # not a model file, one of other features, task or classes, a state dict of another model
            return f"site {site.name!r}: {exc}"
    return None


def _write_rows(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomically(path, buf.getvalue())


@dataclass(frozen=True)
class _KeptRows:
    """The site's split rows before ``[harmonize]`` adjusts them (``raw.npz``), with their covariates."""

    name: str
    features: tuple[str, ...]
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    C_train: np.ndarray
    C_test: np.ndarray

    @classmethod
    def read(cls, site: SiteIdentity) -> _KeptRows:
        if not (site.folder / RAW_FILE).exists():
            raise ConfigError(f"site {site.name!r} has not been set up for a harmonized study (no {RAW_FILE} in "
                              f"{site.folder})")
        with np.load(site.folder / RAW_FILE) as f:
            arrays = {k: f[k] for k in f.files}
        return cls(site.name, tuple(str(c) for c in arrays.pop("features")), **arrays)


def _harmonize(site: SiteIdentity, request: Mapping[str, Any]):
    """A step of ``[harmonize]``'s exchange after setup, on the rows the site kept: ComBat's
    residual moments under the federation's pooled fit (``residuals``), or the adjustment of
    its training and test rows by its share of the fit (``apply``), answered with the moments
    of its adjusted training rows (global scaling is assembled from those, as in simulation)."""
    from medfed.deploy.study import study_from_payload
    from medfed.experiments.harmonization import harmonized_rows

    if not (site.folder / STUDY_FILE).exists():
        raise ConfigError(f"site {site.name!r} has not been set up for this study (no {STUDY_FILE} in {site.folder})")
    method = study_from_payload(json.loads((site.folder / STUDY_FILE).read_text())).harmonize.method
    rows = _KeptRows.read(site)
    step = request.get("step")
    if step == "residuals" and method == "combat" and isinstance(request.get("location"), CombatLocation):
        return residual_stats(SiteRows(site.name, rows.X_train, rows.C_train), request["location"], rows.features)
    expected = {"combat": CombatModel, "frequency": FrequencyModel}.get(method)
    if step == "apply" and expected is not None and isinstance(request.get("model"), expected):
        X_train, X_test = harmonized_rows(request["model"], rows)
        _write_rows(site.folder / ROWS_FILE, X_train=X_train, y_train=rows.y_train, X_test=X_test, y_test=rows.y_test)
        m = Moments.of(X_train)
        return {"moments": {"n": int(m.n), "total": m.total, "total_sq": m.total_sq}}
    raise DataError(f"site {site.name!r}: the coordinator's harmonization request (step {step!r}) does not fit "
                    f"the study's [harmonize] method = {method!r}")


def _own_target(site: SiteIdentity, data) -> dict:
    """A multi-task study's schema for this site's table: its own label column (``label_column_site``,
    else ``label_column``), and the other sites' label columns its file holds left out of the
    features, as the pooled loader leaves every label column out."""
    if not data.label_column_site:
        return {}
    from medfed.data.tables import read_frame

    own = data.label_column_site.get(site.name)
    mine = own or data.label_column
    held = {str(c) for c in read_frame(site.data).columns}
    others = [c for c in dict.fromkeys(data.label_column_site.values()) if c != mine and c in held]
    others += [data.label_column] if own and data.label_column and data.label_column in held else []
    return {"label_column_site": {site.name: own} if own else None, **({"label_column": None} if own else {}),
            "exclude": [*(data.exclude or []), *(c for c in others if c not in (data.exclude or []))]}


def _own_federation(site: SiteIdentity, config):
    """The site's file as a one-site federation, read with the study's schema: a table, or a
    manifest of image files read by the loaders ``medfed run --manifest`` uses."""
    if not site.data.exists():
        raise DataError(f"site {site.name!r}: data file {str(site.data)!r} does not exist")
    from medfed.experiments.harness import load_federation

    d = config.data
    # the loaders, flags and task inference of `medfed run --manifest/--data` on the site's own file
    source = "manifest" if config.deploy.site_files == "manifest" else "path"
    fed = load_federation(d.model_copy(update={source: site.data, **_own_target(site, d)}))
    others = [n for n in fed.site_names if n != site.name]
    if site.name not in fed.site_names or others:
        held = ", ".join(repr(n) for n in fed.site_names)
        raise DataError(
            f"site {site.name!r}: {site.data} column {d.site_column!r} holds {held}; a site's file holds its own rows "
            f"only, with {d.site_column} = {site.name}"
        )
    return fed


# -- rounds --------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    config: Any
    plan: Any  # the experiment's TrainingPlan
    spec: Any
    runtime: SiteRuntime
    X_test: np.ndarray
    y_test: np.ndarray
    train: LocalData  # the site's training rows, standardized as the model sees them


def _prepare(site: SiteIdentity, request: Mapping[str, Any]) -> _Prepared:
    """This request's method and the site's runtime, rebuilt from the site folder. The runtime's
    state is read from disk on every request; what it is built from (the study, the rows, the
    method) is kept per process while those files are unchanged, for a long-lived ClientApp
    process (``medfed deploy site --fast``) answers many requests."""
    absent = [f for f in (STUDY_FILE, ROWS_FILE) if not (site.folder / f).exists()]
    if absent:  # rows.npz: with [harmonize], once the federation's fit has adjusted the rows
        raise ConfigError(f"site {site.name!r} has not been set up for this study (no {absent[0]} in {site.folder})")
    run = request["run"]
    files = tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in (site.folder / STUDY_FILE, site.folder / ROWS_FILE))
    key = (hashlib.sha256(encode(run)).hexdigest(), files)
    cached = _BUILT.get(str(site.folder))
    if cached is None or cached[0] != key:
        cached = _BUILT[str(site.folder)] = (key, _build(site, run))  # one run per site folder is kept
    config, plan, spec, program, data, X_test, y_test = cached[1]
    rng = KeyedRng(int(run["seed"]), tuple(run["key"]))
    runtime = SiteRuntime(program, data, rng, site.folder / "runs" / str(run["name"]), noise_seed=_noise_seed(site))
    commit = request.get("commit")
    if commit is not None:
        runtime.commit(int(commit[0]), bool(commit[1]))
    return _Prepared(config, plan, spec, runtime, X_test, y_test, data)


_BUILT: dict[str, tuple] = {}  # site folder -> (what it was built from, what was built)
NOISE_FILE = "noise.seed"


def _noise_seed(site: SiteIdentity) -> int:
    """The seed of the site's own DP noise (``--dp distributed``), drawn once from the OS CSPRNG
    and kept in the site folder: the coordinator, which knows the run's seed, cannot recompute
    the noise and take it off the sum. A restarted site draws the same noise again."""
    import os

    path = site.folder / NOISE_FILE
    if not path.exists():
        write_bytes_atomically(path, os.urandom(16).hex().encode())
    return int(path.read_text(), 16)


def _build(site: SiteIdentity, run: Mapping[str, Any]) -> tuple:
    from medfed.deploy.study import study_from_payload
    from medfed.experiments.harness import TrainingPlan, build_method, unlabeled_view
    from medfed.methods import resolve_methods
    from medfed.methods.method import context_for

    config = study_from_payload(json.loads((site.folder / STUDY_FILE).read_text()))
    with np.load(site.folder / ROWS_FILE) as rows:
        X_train, y_train, X_test, y_test = (rows[k] for k in ("X_train", "y_train", "X_test", "y_test"))
        # a harmonized site's rows.npz holds none (_harmonize): [harmonize] refuses the methods that learn from them
        X_unlabeled = rows["X_unlabeled"] if "X_unlabeled" in rows.files else None
    (spec, opts), = resolve_methods([run["method"]], {run["method"]: dict(run["options"])}, config.pipelines)
    if opts.get("teacher"):  # the site's own copy of the teacher (checked at setup); the coordinator never reads it
        opts = {**opts, "teacher": str(site.local_path(str(opts["teacher"])))}
    from medfed.data.tasks import n_outputs

    task, classes = run["task"], tuple(run["classes"])
    plan = TrainingPlan.for_shape(config, tuple(run["sample_shape"]), task, n_outputs(task, classes))
    counts = {name: np.asarray(c) for name, c in run["label_counts"].items()}
    scale = _standardizer(run["scale"], X_train.shape[1])
    data = LocalData(site.name, scale(X_train), target_scale(run).forward(y_train) if task == "regression" else y_train,
                     unlabeled_view(X_unlabeled, scale))
    if run.get("phase") == "pretrain":  # a pretraining phase (contrastive): plain local training, no DP or
        # secure aggregation (refused with it), as in simulation
        phase = spec.pretrain(opts, config.training, context_for(list(run["sites"]), config.seed, counts,
                                                                 model=config.model, model_options=config.model_options))
        program = SiteProgram(phase.algorithm, plan.local, make_codec(config.compress), None)
        return config, plan, spec, program, data, scale(X_test), y_test
    algorithm = build_method(config, spec, opts, list(run["sites"]), counts)
    # the site's end of DP (its update clipped before it leaves) and of secure aggregation (its noise, its mask)
    from medfed.deploy.study import site_min_sites

    sizes = {name: float(sum(c)) for name, c in counts.items()}
    algorithm, secure = plan.private(spec, algorithm, sizes, KeyedRng(0), min_sites=site_min_sites(config),
                                     site=True)
    local = plan.sample_private(spec, algorithm, sizes)  # DP-SGD (--dp sample) at the study's noise, or plain
    codec = None if secure is not None else make_codec(config.compress)  # secure: quantized in the ring
    program = SiteProgram(algorithm, local, codec, None if secure is None else secure[0])
    return config, plan, spec, program, data, scale(X_test), y_test


def target_scale(run: Mapping[str, Any]) -> TargetScale:
    """The federation's regression target scale (the coordinator's, from every site's target
    moments), or :data:`UNSCALED` (``[data] standardize_target = false``, or not regression)."""
    scale = run.get("target_scale")
    return UNSCALED if scale is None else TargetScale(float(scale["mean"]), float(scale["std"]))


def _standardizer(scale: Mapping[str, Any] | None, n_features: int) -> Standardizer:
    """The federation's standardization (the coordinator's, from every site's moments), or none."""
    if scale is None:
        return Standardizer.identity(n_features)
    return Standardizer(np.asarray(scale["mean"], dtype=np.float64), np.asarray(scale["scale"], dtype=np.float64))


def _train(site: SiteIdentity, request: Mapping[str, Any]):
    prepared = _prepare(site, request)
    return prepared.runtime.train(plan_of(request["plan"]))


def _evaluate(site: SiteIdentity, request: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics of the final global model and, for a personalizing method, of the site's own
    model, on the site's test rows: the task's metrics, and for a binary task at the decision
    threshold the study's rule chooses on the site's own training rows (as in simulation), with
    that threshold; the personal model stays here."""
    from medfed.experiments.metrics import (
        model_scores,
        model_threshold,
        task_metrics,
        task_scores,
        thresholded_metrics,
    )

    prepared = _prepare(site, request)
    plan = plan_of(request["plan"])
    model = prepared.plan.model
    task, classes = request["run"]["task"], tuple(request["run"]["classes"])
    out: dict[str, Any] = {}

    def metrics(params) -> dict[str, Any] | str:
        if not all(np.isfinite(v).all() for v in params.values()):
            return "diverged: the personal model's parameters hold NaN/Inf"
        if task != "binary":  # the task's own metrics, without a decision threshold (as in simulation)
            predicted = task_scores(model, params, prepared.X_test)
            if predicted is None:
                return "diverged: the model's scores on the test rows are NaN/Inf"
            if task == "regression":  # back on the target's own scale, where every metric is computed
                predicted = target_scale(request["run"]).inverse(predicted)
            return {"metrics": {k: [m.value, m.reason] for k, m in
                                task_metrics(task, prepared.y_test, predicted, classes).items()},
                    "threshold": None}
        scores = model_scores(model, params, prepared.X_test)
        if scores is None:
            return "diverged: the model's scores on the test rows are NaN/Inf"
        threshold = model_threshold(prepared.config.evaluation.threshold, model, params, prepared.train.X,
                                    prepared.train.y)
        return {"metrics": {k: [m.value, m.reason] for k, m in
                            thresholded_metrics(prepared.y_test, *scores, threshold).items()},
                "threshold": [threshold.logit, threshold.reason]}

    if request.get("global_model"):
        out["global"] = metrics(plan.params)
    if request.get("personal"):
        personal = prepared.runtime.personalize(plan)
        out["personal"] = metrics(personal)
        _keep_personal(site, str(request["run"]["method"]), personal)
    return out


def _keep_personal(site: SiteIdentity, method: str, params: Mapping[str, np.ndarray]) -> None:
    """The site's personal model, kept in its own folder (``models/<method>-personal.npz``,
    the parameter view as ``params/<name>``); it never leaves the site."""
    buf = io.BytesIO()
    np.savez(buf, **{f"params/{k}": np.asarray(v) for k, v in params.items()})
    write_bytes_atomically(site.folder / "models" / f"{method}-personal.npz", buf.getvalue())


def _hello(site: SiteIdentity, request: Mapping[str, Any]) -> dict[str, Any]:
    return {"site": site.name}


def _stage(site: SiteIdentity, request: Mapping[str, Any]):
    """One protocol stage of a round (secure aggregation's share, mask, unmask), answered by the
    site's runtime from what it kept on disk since ``train``."""
    prepared = _prepare(site, request)
    return prepared.runtime.stage(str(request["stage"]), int(request["round"]), request["message"])


_OPS = {"hello": _hello, "labels": _labels, "setup": _setup, "harmonize": _harmonize, "train": _train, "stage": _stage,
        "evaluate": _evaluate}
