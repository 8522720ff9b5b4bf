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

from medfed.client.drift import label_counts
from medfed.client.local import LocalData, LocalTraining, sgd_steps
from medfed.data.datasets import load_dataset
from medfed.data.federation import Federation, SingleClassSiteWarning
from medfed.data.preprocess import Moments, Standardizer, impute
from medfed.engine.loop import run_federated
from medfed.experiments.config import DataSpec, ExperimentConfig
from medfed.experiments.methods import resolve_methods
from medfed.experiments.metrics import METRICS, Metric, binary_metrics
from medfed.experiments.spec import MethodSpec, context_for
from medfed.experiments.splits import stratified_split
from medfed.rng import KeyedRng, name_key

SPLIT_STREAM, TRAIN_STREAM, INIT_STREAM = 0, 1, 2


def make_experiment_model(config: ExperimentConfig, federation: Federation):
    """The model the config names, for the federation's sample shape (numpy logistic for tables)."""
    from medfed.models.registry import make_model

    return make_model(config.model, federation.sample_shape, **config.model_options)


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
    evaluation: str = "split"  # "split": a site seen in training; "loso": the site was left out
    model: str = "global"  # "personal": each site's personalized model
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
    rounds_notes: list[dict] = field(default_factory=list)  # rounds with rejected uploads or skipped


def round_notes(history) -> list[dict]:
    """The rounds worth telling a reader about: uploads the server refused, rounds skipped."""
    return [
        {"round": r.round, "rejected": dict(r.rejected), "skipped": r.skipped}
        for r in history
        if r.rejected or r.skipped
    ]


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
    workers: int = 1


def load_federation(spec: DataSpec) -> Federation:
    """The federation a data spec names: an embedded data set or a table file."""
    if spec.dataset is not None:
        options = dict(spec.options)
        if spec.features is not None:
            options["features"] = spec.features
        if spec.impute is not None:
            options["impute"] = spec.impute
        return load_dataset(spec.dataset, **options)
    if spec.npz is not None:
        from medfed.data.images import load_medmnist_npz

        return load_medmnist_npz(spec.npz, positive_classes=spec.positive_classes, use_val=spec.use_val)
    if spec.manifest is not None:
        from medfed.data.images import load_image_manifest

        return load_image_manifest(
            spec.manifest,
            path_column=spec.path_column,
            label_column=spec.label_column or "label",
            site_column=spec.site_column or "site",
            split_column=spec.split_column,
            positive_label=spec.positive_label,
            kind=spec.kind,
            skip_bad=spec.skip_bad,
        )
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
        X_train, X_test = site.X[train], site.X[~train]
        if not fed.is_image:
            X_train, X_test = impute(X_train, X_test, fed.impute, site=site.name, feature_names=fed.feature_names)
        if config.scaling == "site":
            scale = Standardizer.from_moments([Moments.of(X_train)])
            X_train, X_test = scale(X_train), scale(X_test)
        y = site.y.astype(np.float64)
        out.append(SplitSite(site.name, X_train, y[train], X_test, y[~train], Moments.of(X_train)))
    return out


class ScaledViews:
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
                scale = Standardizer.identity(self.sites[0].X_train.shape[1])  # features, or channels
            train = [LocalData(self.sites[i].name, scale(self.sites[i].X_train), self.sites[i].y_train) for i in group]
            tests = [scale(s.X_test) for s in self.sites]
            self._cache[group] = (train, tests)
        return self._cache[group]


@dataclass
class RepeatOutcome:
    """What one repeat produced, in the order a serial run would produce it."""

    evaluations: list[tuple[tuple[str, str, str | None, str], dict[str, Metric] | str, tuple | None]]
    histories: list[History]
    single_class_sites: list[str]
    setting_time: dict[str, float]


def run_repeat(
    config: ExperimentConfig,
    federation: Federation,
    methods: list[tuple[MethodSpec, dict]],
    repeat: int,
    progress: Callable[[str], None] | None = None,
) -> RepeatOutcome:
    """One repeat: split, then train and evaluate every setting. Pure in (config, data, repeat)."""
    model = make_experiment_model(config, federation)
    t = config.training
    site_names = federation.site_names
    n_sites = len(site_names)
    everyone = tuple(range(n_sites))
    epochs = None if t.local_epochs is None else t.rounds * t.local_epochs  # centralized: the same passes
    central = LocalTraining(model, t.lr, t.rounds * t.local_steps, t.batch_size, t.l2, epochs)
    local = LocalTraining(model, t.lr, t.local_steps, t.batch_size, t.l2, t.local_epochs)
    sites = prepare_repeat(federation, config, repeat)
    scaled = ScaledViews(sites, config.scaling)
    # every setting of a repeat starts from the same initial model (zeros for the numpy model)
    initial = model.init_params(federation.sample_shape, KeyedRng(config.seed, (INIT_STREAM, repeat)))
    out = RepeatOutcome([], [], [s.name for s in sites if s.single_class], {})
    single_models: dict[int, dict] = {}

    def evaluate_on(
        spec: MethodSpec, train_site: str | None, j: int, params, tests, evaluation: str = "split",
        model_kind: str = "global",
    ) -> None:
        scores = model.predict_proba(params, tests[j])
        key = (spec.display, spec.name, train_site, site_names[j], evaluation, model_kind)
        out.evaluations.append((key, binary_metrics(sites[j].y_test, scores), (sites[j].y_test, scores)))

    def train_one_federated(spec: MethodSpec, opts: dict, held_out: int | None) -> None:
        """Train ``spec`` on every site (``held_out`` None) or on all but one, and evaluate."""
        group = tuple(i for i in everyone if i != held_out)
        train, tests = scaled(group)
        evaluate = None
        if config.eval_every and held_out is None:
            def evaluate(p, tests=tests):
                return {
                    s.name: binary_metrics(s.y_test, model.predict_proba(p, tests[j]))["auc"].value
                    for j, s in enumerate(sites)
                }
        rounds = spec.rounds(t)
        key = (TRAIN_STREAM, repeat, name_key(spec.name)) + (() if held_out is None else (name_key("loso"), held_out))
        run = run_federated(
            spec.build(opts, t, context_for(
                [site_names[i] for i in group], config.seed,
                {d.name: label_counts(d.y) for d in train},
            )),
            initial,
            train,
            local,
            rounds,
            KeyedRng(config.seed, key),
            fraction=t.fraction_fit,
            min_sites=t.min_sites,
            evaluate=evaluate,
            eval_every=config.eval_every,
            max_update_norm=t.max_update_norm,
        )
        if held_out is not None:
            evaluate_on(spec, None, held_out, run.params, tests, "loso")
            return
        out.histories.append(
            History(
                spec.display, repeat, run.train_loss, sum(r.bytes_up for r in run.history), rounds,
                max(1, t.rounds * t.local_steps // rounds),
                [{"round": r.round, "test_auc": r.evaluation} for r in run.history if r.evaluation],
                round_notes(run.history),
            )
        )
        for j in range(n_sites):
            if spec.global_model:
                evaluate_on(spec, None, j, run.params, tests)
            if site_names[j] in run.personal:
                evaluate_on(spec, None, j, run.personal[site_names[j]], tests, model_kind="personal")

    def single_model(i: int) -> dict:
        if i not in single_models:
            train, _ = scaled((i,))
            rng = KeyedRng(config.seed, (TRAIN_STREAM, repeat, name_key("single"), i))
            single_models[i], _ = sgd_steps(initial, train[0], central.for_site(train[0].n), rng)
        return single_models[i]

    for spec, opts in methods:
        if progress:
            progress(f"repeat {repeat + 1}/{config.repeats}: {spec.display}")
        tic = time.perf_counter()
        if spec.name in ("single", "cross"):
            for i, s in enumerate(sites):
                targets = [i] if spec.name == "single" else [j for j in range(n_sites) if j != i]
                for j in targets:
                    if s.single_class:
                        key = (spec.display, spec.name, s.name, site_names[j], "split", "global")
                        out.evaluations.append((key, f"training rows of site {s.name!r} hold one class only", None))
                    else:
                        evaluate_on(spec, s.name, j, single_model(i), scaled((i,))[1])
        elif spec.name == "mix":
            for held_out in [None, *(range(n_sites) if config.loso else [])]:
                group = tuple(i for i in everyone if i != held_out)
                train, tests = scaled(group)
                pooled = LocalData("pooled", np.concatenate([d.X for d in train]), np.concatenate([d.y for d in train]))
                key = (TRAIN_STREAM, repeat, name_key("mix")) + (() if held_out is None else (name_key("loso"), held_out))
                params, _ = sgd_steps(initial, pooled, central.for_site(pooled.n), KeyedRng(config.seed, key))
                for j in range(n_sites) if held_out is None else [held_out]:
                    evaluate_on(spec, None, j, params, tests, "split" if held_out is None else "loso")
        else:
            loso = config.loso and spec.global_model  # an unseen site has no private part to use
            for held_out in [None, *(range(n_sites) if loso else [])]:
                train_one_federated(spec, opts, held_out)
        out.setting_time[spec.display] = time.perf_counter() - tic
    return out


def _repeat_task(config: ExperimentConfig, federation: Federation, repeat: int) -> RepeatOutcome:
    # method specs hold functions that do not pickle; the worker resolves the names itself
    return run_repeat(config, federation, resolve_methods(config.methods, config.method_options, config.pipelines), repeat)


def _parallel_outcomes(config, federation, workers, progress):
    """Repeats in forked worker processes; results come back in repeat order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_repeat_task, config, federation, r) for r in range(config.repeats)]
        outcomes = []
        for r, future in enumerate(futures):
            outcomes.append(future.result())
            if progress:
                progress(f"repeat {r + 1}/{config.repeats} done")
    return outcomes


def resolve_workers(requested: int, repeats: int) -> int:
    """0 means: one worker per core, at most one per repeat; fork is needed for more than one."""
    import multiprocessing
    import os

    if requested == 1 or repeats == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested or cores, repeats))


def run_experiment(
    config: ExperimentConfig,
    federation: Federation,
    progress: Callable[[str], None] | None = None,
) -> ExperimentRun:
    """Run every configured setting over ``config.repeats`` repeats and collect per-site results.

    Repeats are independent and keyed by their index, so running them in parallel
    (``config.workers``) gives the same numbers as running them one after another.
    """
    started = time.perf_counter()
    methods = resolve_methods(config.methods, config.method_options, config.pipelines)
    workers = resolve_workers(config.workers, config.repeats)
    if workers > 1:
        outcomes = _parallel_outcomes(config, federation, workers, progress)
    else:
        outcomes = [run_repeat(config, federation, methods, r, progress) for r in range(config.repeats)]

    cells: dict[tuple, Cell] = {}
    notes: list[str] = []
    if config.loso:
        local_only = [spec.display for spec, _ in methods if spec.name in ("single", "cross")]
        if local_only:
            notes.append(
                f"leave-one-site-out: {', '.join(local_only)} train on one site and have no unseen-site rows "
                "(Cross already tests on sites it never saw)"
            )
        partial = [spec.display for spec, _ in methods if not spec.global_model]
        if partial:
            notes.append(
                f"leave-one-site-out: {', '.join(partial)} keep part of the model at each site, so an unseen "
                "site has no complete model; no unseen-site rows"
            )
    noted_sites: set[str] = set()
    setting_time = {spec.display: 0.0 for spec, _ in methods}
    for repeat, outcome in enumerate(outcomes):
        for name in outcome.single_class_sites:
            if name not in noted_sites:
                noted_sites.add(name)
                note = (
                    f"site {name!r}: training rows hold one class only (first in repeat {repeat + 1}); "
                    "it takes part in federated training, but models fitted on it alone are not computable"
                )
                notes.append(note)
                warnings.warn(note, SingleClassSiteWarning, stacklevel=2)
        for key, result, scores in outcome.evaluations:
            if key not in cells:
                cells[key] = Cell(*key)
            c = cells[key]
            if isinstance(result, str):
                for m in METRICS:
                    c.metrics[m].append(Metric(None, result))
                c.skipped.append(result)
            else:
                for m in METRICS:
                    c.metrics[m].append(result[m])
                c.skipped.append(None)
                c.scores.append(scores)
        for name, seconds in outcome.setting_time.items():
            setting_time[name] += seconds

    return ExperimentRun(
        config=config,
        federation=federation,
        cells=list(cells.values()),
        histories=[h for o in outcomes for h in o.histories],
        warnings=notes,
        runtime_s=time.perf_counter() - started,
        setting_runtime_s=setting_time,
        methods=methods,
        workers=workers,
    )
