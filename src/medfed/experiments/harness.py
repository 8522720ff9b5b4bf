"""The experiment of survey §6: every setting on the same repeated per-site splits.

For each repeat, each site is split (stratified 80/20, or the data's predefined split),
imputed and standardized from training rows only; then every requested setting trains
and is evaluated on every site's test rows. All settings share one optimizer
(:class:`~medfed.experiments.config.TrainingSpec`): a federated site runs ``local_steps``
iterations per round; a centralized model (Single, Cross, Mix) runs ``rounds * local_steps``
iterations, the same gradient budget as one federated site.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from medfed.client.local import LocalData, LocalTraining, sgd_steps
from medfed.data.datasets import load_dataset
from medfed.data.federation import Federation, SingleClassSiteWarning
from medfed.data.preprocess import Moments, Standardizer, impute
from medfed.engine.loop import run_federated
from medfed.experiments.config import DataSpec, ExperimentConfig
from medfed.experiments.methods import MethodSpec, resolve_methods
from medfed.experiments.metrics import METRICS, Metric, binary_metrics
from medfed.experiments.splits import stratified_split
from medfed.models.logistic import LogisticRegression
from medfed.rng import KeyedRng, name_key

SPLIT_STREAM, TRAIN_STREAM = 0, 1


@dataclass
class SplitSite:
    """One site in one repeat: imputed raw rows and the moments its training rows share."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    moments: Moments

    @property
    def single_class(self) -> bool:
        return np.unique(self.y_train).size < 2


@dataclass
class Cell:
    """One row of the results table: a setting trained on ``train_site`` tested on ``test_site``."""

    setting: str
    method: str
    train_site: str | None
    test_site: str
    metrics: dict[str, list[Metric]] = field(default_factory=lambda: {m: [] for m in METRICS})
    skipped: list[str | None] = field(default_factory=list)  # per repeat: reason or None
    scores: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


@dataclass
class History:
    setting: str
    repeat: int
    train_loss: np.ndarray
    bytes_up: int
    rounds: int
    steps_per_round: int  # gradient steps a site takes per communication round
    evaluation: list[dict] = field(default_factory=list)


@dataclass
class ExperimentRun:
    """Everything an experiment produced, before any formatting."""

    config: ExperimentConfig
    federation: Federation
    cells: list[Cell]
    histories: list[History]
    warnings: list[str]
    runtime_s: float
    setting_runtime_s: dict[str, float]
    methods: list[tuple[MethodSpec, dict]]


def load_federation(spec: DataSpec) -> Federation:
    """The federation a data spec names: an embedded data set or a table file."""
    if spec.dataset is not None:
        options = dict(spec.options)
        if spec.features is not None:
            options["features"] = spec.features
        if spec.impute is not None:
            options["impute"] = spec.impute
        return load_dataset(spec.dataset, **options)
    from medfed.data.tables import load_table

    return load_table(
        spec.path,
        site_column=spec.site_column,
        label_column=spec.label_column,
        split_column=spec.split_column,
        features=spec.features,
        impute=spec.impute,
        positive_label=spec.positive_label,
    )


def prepare_repeat(fed: Federation, config: ExperimentConfig, repeat: int) -> list[SplitSite]:
    """Split and impute every site for one repeat; randomness keyed by (repeat, site)."""
    out = []
    root = KeyedRng(config.seed, (SPLIT_STREAM, repeat))
    for i, site in enumerate(fed.sites):
        if site.split is not None:
            train = site.split
        else:
            train = stratified_split(site.y, config.test_fraction, root.child(i).generator)
        X_train, (X_test,) = impute(
            site.X[train], [site.X[~train]], fed.impute, site=site.name, feature_names=fed.feature_names
        )
        if config.scaling == "site":
            scale = Standardizer.from_moments([Moments.of(X_train)])
            X_train, X_test = scale(X_train), scale(X_test)
        y = site.y.astype(np.float64)
        out.append(SplitSite(site.name, X_train, y[train], X_test, y[~train], Moments.of(X_train)))
    return out


class _Scaled:
    """Standardized views of a repeat's sites for a given set of training sites (cached).

    With ``scaling = "global"`` a model is standardized with the statistics of the data it
    learns from, assembled from those sites' moments; the same transform applies to every
    test set it is evaluated on (as a deployed model would apply it).
    """

    def __init__(self, sites: list[SplitSite], mode: str) -> None:
        self.sites, self.mode = sites, mode
        self._cache: dict[tuple[int, ...], tuple[list[LocalData], list[np.ndarray]]] = {}

    def __call__(self, group: tuple[int, ...]) -> tuple[list[LocalData], list[np.ndarray]]:
        if group not in self._cache:
            if self.mode == "global":
                scale = Standardizer.from_moments([self.sites[i].moments for i in group])
            else:  # "site" was applied in prepare_repeat; "none" leaves values as they are
                scale = Standardizer.identity(self.sites[0].X_train.shape[1])
            train = [LocalData(self.sites[i].name, scale(self.sites[i].X_train), self.sites[i].y_train) for i in group]
            tests = [scale(s.X_test) for s in self.sites]
            self._cache[group] = (train, tests)
        return self._cache[group]


def _record(cell: Cell, y: np.ndarray, scores: np.ndarray) -> None:
    for name, metric in binary_metrics(y, scores).items():
        cell.metrics[name].append(metric)
    cell.skipped.append(None)
    cell.scores.append((y, scores))


def _skip(cell: Cell, reason: str) -> None:
    for name in METRICS:
        cell.metrics[name].append(Metric(None, reason))
    cell.skipped.append(reason)


def run_experiment(
    config: ExperimentConfig,
    federation: Federation,
    progress: Callable[[str], None] | None = None,
) -> ExperimentRun:
    """Run every configured setting over ``config.repeats`` repeats and collect per-site results."""
    started = time.perf_counter()
    methods = resolve_methods(config.methods, config.method_options)
    model = LogisticRegression()
    t = config.training
    site_names = federation.site_names
    n_sites = len(site_names)
    everyone = tuple(range(n_sites))
    cells: dict[tuple[str, str | None, str], Cell] = {}
    histories: list[History] = []
    notes: list[str] = []
    single_class_noted: set[str] = set()
    setting_time = {spec.display: 0.0 for spec, _ in methods}
    central = LocalTraining(model, t.lr, t.rounds * t.local_steps, t.batch_size, t.l2)
    local = LocalTraining(model, t.lr, t.local_steps, t.batch_size, t.l2)

    def cell(spec: MethodSpec, train_site: str | None, test_site: str) -> Cell:
        key = (spec.display, train_site, test_site)
        if key not in cells:
            cells[key] = Cell(spec.display, spec.name, train_site, test_site)
        return cells[key]

    for repeat in range(config.repeats):
        sites = prepare_repeat(federation, config, repeat)
        for s in sites:
            if s.single_class and s.name not in single_class_noted:
                single_class_noted.add(s.name)
                note = (
                    f"site {s.name!r}: training rows hold one class only (first in repeat {repeat + 1}); "
                    "it takes part in federated training, but models fitted on it alone are not computable"
                )
                notes.append(note)
                warnings.warn(note, SingleClassSiteWarning, stacklevel=2)
        scaled = _Scaled(sites, config.scaling)
        single_models: dict[int, dict] = {}

        def single_model(i: int) -> dict:
            if i not in single_models:
                train, _ = scaled((i,))
                rng = KeyedRng(config.seed, (TRAIN_STREAM, repeat, name_key("single"), i))
                single_models[i], _ = sgd_steps(model.init(train[0].X.shape[1]), train[0], central, rng)
            return single_models[i]

        for spec, opts in methods:
            if progress:
                progress(f"repeat {repeat + 1}/{config.repeats}: {spec.display}")
            tic = time.perf_counter()
            if spec.name in ("single", "cross"):
                for i, s in enumerate(sites):
                    targets = [i] if spec.name == "single" else [j for j in range(n_sites) if j != i]
                    for j in targets:
                        c = cell(spec, s.name, site_names[j])
                        if s.single_class:
                            _skip(c, f"training rows of site {s.name!r} hold one class only")
                            continue
                        params = single_model(i)
                        _, tests = scaled((i,))
                        _record(c, sites[j].y_test, model.predict_proba(params, tests[j]))
            elif spec.name == "mix":
                train, tests = scaled(everyone)
                pooled = LocalData(
                    "pooled", np.concatenate([d.X for d in train]), np.concatenate([d.y for d in train])
                )
                rng = KeyedRng(config.seed, (TRAIN_STREAM, repeat, name_key("mix")))
                params, _ = sgd_steps(model.init(pooled.X.shape[1]), pooled, central, rng)
                for j, s in enumerate(sites):
                    _record(cell(spec, None, s.name), s.y_test, model.predict_proba(params, tests[j]))
            else:
                train, tests = scaled(everyone)
                evaluate = None
                if config.eval_every:
                    def evaluate(p, tests=tests):
                        return {
                            s.name: binary_metrics(s.y_test, model.predict_proba(p, tests[j]))["auc"].value
                            for j, s in enumerate(sites)
                        }
                rounds = spec.rounds(t)
                run = run_federated(
                    spec.build(opts, t),
                    model.init(train[0].X.shape[1]),
                    train,
                    local,
                    rounds,
                    KeyedRng(config.seed, (TRAIN_STREAM, repeat, name_key(spec.name))),
                    fraction=t.fraction_fit,
                    min_sites=t.min_sites,
                    evaluate=evaluate,
                    eval_every=config.eval_every,
                )
                histories.append(
                    History(
                        spec.display, repeat, run.train_loss, sum(r.bytes_up for r in run.history), rounds,
                        max(1, t.rounds * t.local_steps // rounds),
                        [dict(round=r.round, **r.evaluation) for r in run.history if r.evaluation],
                    )
                )
                for j, s in enumerate(sites):
                    _record(cell(spec, None, s.name), s.y_test, model.predict_proba(run.params, tests[j]))
            setting_time[spec.display] += time.perf_counter() - tic

    return ExperimentRun(
        config=config,
        federation=federation,
        cells=list(cells.values()),
        histories=histories,
        warnings=notes,
        runtime_s=time.perf_counter() - started,
        setting_runtime_s=setting_time,
        methods=methods,
    )
