"""The experiment of survey §6: every setting on the same repeated per-site splits.

For each repeat, each site is split (stratified 80/20, or the data's predefined split),
imputed and standardized from training rows only; then every requested setting trains
and is evaluated on every site's test rows. All settings share one optimizer
(:class:`~medfed.experiments.config.TrainingSpec`): a federated site runs ``local_steps``
iterations per round; a centralized model (Single, Cross, Mix) runs ``rounds * local_steps``
iterations, the same gradient budget as one federated site.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.client.drift import class_count, label_counts
from medfed.client.local import LocalData, LocalTraining, sgd_steps
from medfed.data.categorical import keep_training_levels, training_levels, unseen_level_notes
from medfed.data.datasets import load_dataset
from medfed.data.federation import Federation, SingleClassSiteWarning
from medfed.data.preprocess import Imputer, Moments, Standardizer
from medfed.data.tasks import UNSCALED, TargetScale, check_task, strata, target_moments
from medfed.comm.compress import make_codec
from medfed.engine.executors import LOCAL_EXECUTORS
from medfed.engine.executors.process import exit_with_parent
from medfed.engine.executors.ray import connect as connect_ray
from medfed.engine.faults import parse_drops
from medfed.engine.loop import FederatedAlgorithm, FederatedRun, run_federated
from medfed.errors import ConfigError, MedfedError
from medfed.experiments.config import DataSpec, ExperimentConfig
from medfed.experiments.metrics import (
    BINARY,
    HALF,
    Metric,
    Threshold,
    metric_keys,
    model_scores,
    model_threshold,
    task_metrics,
    task_scores,
    thresholded_metrics,
)
from medfed.experiments.saved_model import MODEL_ROWS, SAVED_REPEAT, ModelOutcome, name_files, saved_model_file
from medfed.experiments.splits import kept_labels, stratified_split
from medfed.methods import METHOD_FLAGS, Method, context_for, resolve_methods
from medfed.rng import KeyedRng, name_key
from medfed.server.validate import NONFINITE

SPLIT_STREAM, TRAIN_STREAM, INIT_STREAM = 0, 1, 2

# A training loss that ends above this multiple of where it started is warned about.
LOSS_RISE_WARNING = 2.0
# A segmentation model's predictions are kept for this many test images per site (the overlay
# plots'); the metrics use every test image. Keeping all would hold n x K x pixels per cell and repeat.
SEGMENTATION_EXAMPLES = 3


@dataclass(frozen=True)
class Failure:
    """Why a model of one repeat is not scored: it ``diverged`` (its loss, parameters or scores
    became NaN/Inf) or it is ``not computable`` (e.g. the server accepted no upload)."""

    kind: str  # "diverged" or "not computable"
    reason: str
    round: int | None = None  # 1-based round (federated) in which it happened, when known

    def __str__(self) -> str:
        return self.reason


@dataclass
class CentralFit:
    """A centralized model (Single, Cross, Mix) and its training loss before and after."""

    params: dict[str, np.ndarray]
    start_loss: float
    end_loss: float


def _all_finite(params) -> bool:
    return all(np.isfinite(v).all() for v in params.values())


def federated_failure(run: FederatedRun) -> Failure | None:
    """Why a federated run's global model must not be scored, or ``None``.

    - every round was skipped (the server accepted no upload at all): not computable;
    - the training loss the sites report at the global model became NaN/Inf, or every upload
      of a round held NaN/Inf (no site could take a finite step from the global model), or the
      final parameters are not finite: diverged, with the first such round.
    """
    history = run.history
    for r in history:
        if r.skipped is None and r.loss_reported and not np.isfinite(r.train_loss):
            return Failure("diverged", f"diverged in round {r.round + 1}: the training loss became NaN/Inf", r.round + 1)
        if r.skipped and r.rejected and all(NONFINITE in why for why in r.rejected.values()):
            return Failure(
                "diverged", f"diverged in round {r.round + 1}: every site's update held NaN/Inf", r.round + 1
            )
    if not _all_finite(run.params):
        return Failure("diverged", "diverged: the final parameters hold NaN/Inf")
    if history and all(r.skipped for r in history):
        example = next((f"round {r.round + 1}: {s}: {why}" for r in history for s, why in r.rejected.items()), None)
        return Failure(
            "not computable",
            f"the server accepted no upload in any of the {len(history)} rounds"
            + (f" (e.g. {example})" if example else ""),
        )
    return None


def loss_rise(start: float, end: float) -> bool:
    """A finite training loss that ended far above where it started (``LOSS_RISE_WARNING``)."""
    return bool(np.isfinite(start) and np.isfinite(end) and end > LOSS_RISE_WARNING * start and end - start > 1e-12)


RESUME_DIR = ".medfed-resume"
"""The folder under ``out`` where ``--resume`` keeps each federated run's checkpoints."""


def discard_checkpoints(config: ExperimentConfig) -> None:
    """Remove the checkpoints ``--resume`` kept, once the run's results are written."""
    import shutil

    if config.resume and config.out is not None:
        shutil.rmtree(Path(config.out) / RESUME_DIR, ignore_errors=True)


def study_fingerprint(config: ExperimentConfig) -> str:
    """A digest of everything in the config that changes numbers (not where sites run, how many
    workers, or where and how results are written): a checkpoint resumes only into its own study."""
    import hashlib

    numbers = config.model_dump(mode="json", exclude={"out", "overwrite", "resume", "workers", "executor", "ray_address",
                                                      "plots", "plot_formats"})
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:16]


def build_method(config: ExperimentConfig, spec: Method, opts: dict, site_names, counts=None) -> FederatedAlgorithm:
    """``spec`` built for these training sites (their label counts shared at setup) and the
    config's model (whose local optimizer some methods require); a method with a ``teacher``
    option gets that model file loaded (:func:`medfed.experiments.saved_model.load_teacher`)."""
    teacher = None
    if opts.get("teacher"):
        from medfed.experiments.saved_model import load_teacher

        teacher = load_teacher(opts["teacher"])
    return spec.build(opts, config.training, context_for(
        list(site_names), config.seed, counts, model=config.model, model_options=config.model_options,
        teacher=teacher))


@dataclass
class TrainingPlan:
    """How every setting of a run trains: the model, a federated site's round
    (``local``: ``local_steps`` or ``local_epochs`` per round) and a centralized model's budget
    (``central``: ``rounds * local_steps``, the same gradient budget as one federated site).

    The experiment harness and the robustness audit both train through this one object, so
    the options that shape training (epochs, label counts at setup, the local optimizer)
    reach every caller alike.
    """

    config: ExperimentConfig
    model: Any
    local: LocalTraining
    central: LocalTraining

    @classmethod
    def of(cls, config: ExperimentConfig, federation: Federation) -> TrainingPlan:
        return cls.for_shape(config, federation.sample_shape, federation.task, federation.n_classes)

    @classmethod
    def for_shape(cls, config: ExperimentConfig, sample_shape: tuple[int, ...], task: str = "binary",
                  n_classes: int | None = None) -> TrainingPlan:
        """The plan for samples of ``sample_shape`` (all a deployed site or coordinator knows) and
        targets of ``task`` (``config.model`` resolved for it: ``logistic`` is the task's GLM)."""
        from medfed.models.registry import make_model

        model = make_model(config.model, tuple(sample_shape), task=task, n_classes=n_classes,
                           loss=config.training.robust_loss(), **config.model_options)
        t = config.training
        epochs = None if t.local_epochs is None else t.rounds * t.local_epochs  # centralized: the same passes
        central = LocalTraining(model, t.lr, t.rounds * t.local_steps, t.batch_size, t.l2, epochs)
        local = LocalTraining(model, t.lr, t.local_steps, t.batch_size, t.l2, t.local_epochs)
        return cls(config, model, local, central)

    def initial(self, federation: Federation | tuple[int, ...], repeat: int) -> dict[str, np.ndarray]:
        """The model every setting of a repeat starts from (zeros for the numpy model), for the
        federation's sample shape (or the shape itself)."""
        shape = federation if isinstance(federation, tuple) else federation.sample_shape
        return self.model.init_params(shape, KeyedRng(self.config.seed, (INIT_STREAM, repeat)))

    def build(self, spec: Method, opts: dict, site_names, counts=None) -> FederatedAlgorithm:
        return build_method(self.config, spec, opts, site_names, counts)

    def federated(
        self,
        spec: Method,
        opts: dict,
        train: list[LocalData],
        initial,
        rng: KeyedRng,
        *,
        evaluate: Callable | None = None,
        adapt: Callable[[FederatedAlgorithm], FederatedAlgorithm] | None = None,
        run_key: str | None = None,
    ) -> FederatedRun:
        """Train ``spec`` on ``train`` for its rounds, on the config's executor with its injected
        dropouts. ``adapt`` may change the built algorithm (the audit's corrupted sites). With
        ``resume`` on, the run checkpoints under ``out`` as ``run_key`` and continues from there."""
        config, t = self.config, self.config.training
        counts = {d.name: label_counts(d.y, class_count(self.model)) for d in train}
        pretraining: tuple = ()
        if spec.pretrain is not None:  # phase 1 is its own run; its final model starts the method's
            spec, opts, initial, pretraining = self.pretrained(spec, opts, train, initial, rng, counts)
        algorithm = self.build(spec, opts, [d.name for d in train], counts)
        if adapt is not None:
            algorithm = adapt(algorithm)
        sizes = {d.name: float(d.n) for d in train}
        algorithm, secure = self.private(spec, algorithm, sizes, rng.child(name_key("dp-noise")))  # apart from rounds' keys
        local = self.sample_private(spec, algorithm, sizes)
        checkpoint_dir = None
        if config.resume and config.out is not None and run_key is not None:
            checkpoint_dir = Path(config.out) / RESUME_DIR / run_key
        run = run_federated(
            algorithm, initial, train, local, spec.rounds(t), rng,
            fraction=t.fraction_fit, min_sites=t.min_sites, evaluate=evaluate,
            eval_every=config.eval_every if evaluate is not None else 0, max_update_norm=t.max_update_norm,
            executor=config.executor, ray_address=config.ray_address, faults=parse_drops(config.drop), checkpoint_dir=checkpoint_dir,
            fingerprint=f"{study_fingerprint(config)}/{run_key}",
            poisson=config.privacy.dp != "none", secure=secure,
            codec=None if secure is not None else make_codec(config.compress),  # secure: quantized in the ring
        )
        # the pretraining rounds' uploads left the sites too: the history counts them (federated_history)
        return dataclasses.replace(run, pretraining=pretraining) if pretraining else run

    def pretrained(self, spec: Method, opts: dict, train: list[LocalData], initial, rng: KeyedRng, counts):
        """Run ``spec``'s pretraining phase (contrastive) from ``initial``: the method that follows,
        its options, the pretrained parameters it starts from and the phase's round records.
        Refused with DP and secure aggregation (phase 1's uploads are not in the privacy ledger)
        and for models it cannot pretrain."""
        config = self.config
        check_pretraining(config, spec)
        phase = spec.pretrain(opts, config.training, context_for(
            [d.name for d in train], config.seed, counts, model=config.model, model_options=config.model_options))
        history: tuple = ()
        if phase.rounds > 0:
            run = run_federated(
                phase.algorithm, initial, train, self.local, phase.rounds, rng.child(name_key("contrastive/pretrain")),
                fraction=config.training.fraction_fit, min_sites=config.training.min_sites,
                executor=config.executor, ray_address=config.ray_address, faults=parse_drops(config.drop),
                codec=make_codec(config.compress),
            )
            initial, history = run.params, tuple(run.history)
        return phase.finetune, phase.finetune_options, initial, history

    def private(self, spec: Method, algorithm: FederatedAlgorithm, sizes: dict[str, float], rng: KeyedRng,
                min_sites: int | None = None, site: bool = False):
        """``algorithm`` with client-level or distributed DP, and each side's secure aggregation
        (None without it), in simulation and deployed alike (``sizes``: site -> training rows;
        ``min_sites``: the fewest sites a round accepts, the training's unless deployed; ``site``:
        only the site's half is used, so the server's noise multiplier is not calibrated)."""
        p, t = self.config.privacy, self.config.training
        min_sites = t.min_sites if min_sites is None else min_sites
        if p.dp in ("client", "distributed"):
            from medfed.comm.secure import site_noise_std
            from medfed.methods.privacy import client_dp

            z = 0.0 if site and p.dp == "client" else self.noise_multiplier(spec)
            algorithm = client_dp(
                algorithm, spec.name, clip=p.clip, noise_multiplier=z if p.dp == "client" else 0.0,
                sizes=sizes, rate=t.fraction_fit, rng=rng, adaptive=p.adaptive_clip,
                site_noise=site_noise_std(z, p.clip, sizes, max(min_sites, 2)) if p.dp == "distributed" else 0.0,
                mode=p.dp)
        if not p.secure_aggregation:
            return algorithm, None
        from medfed.comm.secure import quantization_bits
        from medfed.methods.privacy import secure_sides

        return algorithm, secure_sides(algorithm, spec.name, clip=p.clip, sizes=sizes, min_sites=min_sites,
                                       threshold=p.secure_threshold, degree=p.secure_degree,
                                       distributed_noise=self.noise_multiplier(spec) if p.dp == "distributed" else 0.0,
                                       bits=quantization_bits(self.config.compress))

    def sample_private(self, spec: Method, algorithm: FederatedAlgorithm, sizes: Mapping[str, float]) -> LocalTraining:
        """The sites' local training: with ``--dp sample``, DP-SGD at the noise multiplier that
        keeps every site (``sizes``: site -> training rows) within the budget, in simulation and
        deployed alike; the plan's own training otherwise."""
        p = self.config.privacy
        if p.dp != "sample":
            return self.local
        from medfed.client.dp_sgd import DpSgd
        from medfed.methods.privacy import check_sample_dp

        check_sample_dp(algorithm, spec.name, self.model, self.config.training.batch_size)
        train = [LocalData(s, np.empty((int(n), 0)), np.empty(0)) for s, n in sizes.items()]
        return dataclasses.replace(self.local, dp_sgd=DpSgd(p.clip, self.sample_noise(spec, train)))

    def noise_multiplier(self, spec: Method) -> float:
        """The DP noise multiplier of ``spec``'s run: the configured one, or the smallest that keeps
        every site at epsilon <= target_epsilon over the method's rounds."""
        p = self.config.privacy
        if p.target_epsilon is None:
            return float(p.noise)
        from medfed.comm.privacy import calibrate_noise

        return calibrate_noise(self.config.training.fraction_fit, spec.rounds(self.config.training), p.delta,
                               p.target_epsilon, p.accountant)

    def _sample_steps(self, spec: Method, n: int) -> tuple[float, int]:
        """A site's DP-SGD accounting: its Poisson rate and its steps over the run."""
        from medfed.client.dp_sgd import sampling_rate

        t = self.config.training
        return sampling_rate(t.batch_size, n), spec.rounds(t) * self.local.for_site(n).steps

    def sample_noise(self, spec: Method, train) -> float:
        """DP-SGD's noise multiplier: the configured one, or the smallest that keeps every site
        (the one with the largest rate and most steps the worst) at epsilon <= target_epsilon."""
        p = self.config.privacy
        if p.target_epsilon is None:
            return float(p.noise)
        from medfed.comm.privacy import calibrate_noise

        # epsilon grows with the rate and with the steps: only a site that no other site matches or
        # exceeds in both can need the most noise (with steps alike, the one with the fewest rows)
        budgets = {self._sample_steps(spec, d.n) for d in train}
        worst = [(q, steps) for q, steps in budgets
                 if not any(q2 >= q and s2 >= steps and (q2, s2) != (q, steps) for q2, s2 in budgets)]
        return max(calibrate_noise(q, steps, p.delta, p.target_epsilon, p.accountant) for q, steps in worst)

    def ledger(self, spec: Method, sites, repeat: int, sizes=None) -> list[dict]:
        """What each site spent in ``spec``'s run: client-level DP accounts the rounds it could
        have been sampled in, the same for every site; DP-SGD each site's own steps at its own
        rate (``sizes``: site -> training rows)."""
        p, t = self.config.privacy, self.config.training
        if p.dp == "none" or spec.kind != "federated":
            return []
        from medfed.comm.privacy import client_level_epsilon

        if p.dp == "sample":
            rows = {s: int(sizes[s]) for s in sites}
            z = self.sample_noise(spec, [LocalData(s, np.empty((n, 0)), np.empty(0)) for s, n in rows.items()])
            entries = []
            for site in sites:
                q, steps = self._sample_steps(spec, rows[site])
                entries.append({"setting": spec.display, "repeat": repeat, "site": site, "mode": "sample",
                                "clip": p.clip, "adaptive_clip": False, "noise_multiplier": z, "sampling_rate": q,
                                "steps": steps, "delta": p.delta, "accountant": p.accountant,
                                "epsilon": client_level_epsilon(q, z, steps, p.delta, p.accountant)})
            return entries

        z, rounds = self.noise_multiplier(spec), spec.rounds(t)
        eps = client_level_epsilon(t.fraction_fit, z, rounds, p.delta, p.accountant)
        return [{"setting": spec.display, "repeat": repeat, "site": site, "mode": p.dp, "clip": p.clip,
                 "adaptive_clip": p.adaptive_clip,
                 "noise_multiplier": z, "sampling_rate": t.fraction_fit, "steps": rounds, "delta": p.delta,
                 "accountant": p.accountant, "epsilon": eps} for site in sites]

    def centralized(self, data: LocalData, initial, rng: KeyedRng) -> CentralFit:
        """Single, Cross and Mix: gradient descent on one data set for the centralized budget."""
        params, start = sgd_steps(initial, data, self.central.for_site(data.n), rng)
        end = self.model.loss(params, data.X, data.y, self.central.l2) if _all_finite(params) else float("nan")
        return CentralFit(params, float(start), float(end))


def _pooled_rows(data: list[LocalData]) -> tuple[np.ndarray, np.ndarray]:
    """The rows and labels of ``data`` stacked (one site's as they are)."""
    if len(data) == 1:
        return data[0].X, data[0].y
    return np.concatenate([d.X for d in data]), np.concatenate([d.y for d in data])


def _reason(failure: Failure | None) -> str | None:
    return None if failure is None else failure.reason


def centralized_failure(fit: CentralFit) -> Failure | None:
    if not _all_finite(fit.params) or not np.isfinite(fit.end_loss):
        return Failure("diverged", "diverged: the training loss or the parameters became NaN/Inf")
    return None


@dataclass
class SplitSite:
    """One site in one repeat: imputed raw rows and the moments its training rows share."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    moments: Moments
    unseen_levels: dict[str, dict[str, int]] = field(default_factory=dict)  # column -> level -> test rows
    # how the rows were preprocessed, for a saved model to do the same to new rows
    imputer: Imputer | None = None  # fitted on the training rows (tables with an impute strategy)
    scaler: Standardizer | None = None  # the site's own standardization (scaling = "site")
    known_levels: dict[str, np.ndarray] = field(default_factory=dict)  # column -> levels any site trained on
    # the covariates harmonization preserves (data.covariates, in that order), split like the rows
    C_train: np.ndarray | None = None
    C_test: np.ndarray | None = None
    target_moments: Moments | None = None  # a regression target's n, sum y, sum y^2 over the training rows
    # training rows without a target (unlabeled in the data, or hidden by [data] labeled_fraction), imputed and
    # scaled as X_train; every supervised method leaves them out, semi-supervised ones may learn from them
    X_unlabeled: np.ndarray | None = None
    n_hidden: int = 0  # how many of them had their label hidden by the labeled fraction

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
    metrics: dict[str, list[Metric]] = field(default_factory=lambda: {m: [] for m in BINARY.keys})  # per task
    skipped: list[str | None] = field(default_factory=list)  # per repeat: reason or None
    thresholds: list[Threshold | None] = field(default_factory=list)  # per repeat: the decision threshold used
    threshold_rows: str | None = None  # which training rows chose it (THRESHOLD_ROWS)
    scores: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # segmentation: per scored repeat, the images of scores
    diverged: list[dict] = field(default_factory=list)  # {"repeat", "round", "reason"} per diverged repeat
    warnings: list[str] = field(default_factory=list)  # e.g. a training loss that rose far above its start


def example_rows(masks: np.ndarray, k: int = SEGMENTATION_EXAMPLES) -> np.ndarray:
    """The test rows whose segmentation is kept for the overlay plots: the first ``k`` whose
    true mask holds a foreground class (they have a Dice), then the first others; the same
    rows for every setting tested on the site, since they depend on the masks alone."""
    masks = np.asarray(masks)
    has = masks.reshape(masks.shape[0], -1).max(axis=1, initial=0) > 0
    return np.r_[np.flatnonzero(has), np.flatnonzero(~has)][:k]


def round_metrics(y_test: np.ndarray, scores: tuple[np.ndarray, np.ndarray] | None,
                  threshold: Threshold = HALF) -> dict[str, float | None]:
    """The global model's metrics on one site's test rows during training, from
    :func:`model_scores`, at ``threshold`` (chosen on the site's training rows at the same
    model); ``None`` where a metric is undefined there or the model diverged."""
    if scores is None:
        return {m: None for m in BINARY.keys}
    return {m: metric.value for m, metric in thresholded_metrics(y_test, *scores, threshold).items()}


def task_round_metrics(task: str, classes: tuple[str, ...], y_test: np.ndarray,
                       scores: np.ndarray | None) -> dict[str, float | None]:
    """:func:`round_metrics` of a multiclass or regression task, from :func:`task_scores`."""
    if scores is None:
        return {m: None for m in metric_keys(task, classes)}
    return {m: metric.value for m, metric in task_metrics(task, y_test, scores, classes).items()}


@dataclass
class History:
    """One federated run's record: training loss per round and, with ``eval_every``, per
    evaluated round ``{"round" (0-based, evaluated after it), "test_auc": {site: AUC},
    "test_metrics": {site: {metric: value or None}}}``."""

    setting: str
    repeat: int
    train_loss: np.ndarray
    bytes_up: int
    rounds: int
    steps_per_round: int  # gradient steps a site takes per communication round
    evaluation: list[dict] = field(default_factory=list)
    rounds_notes: list[dict] = field(default_factory=list)  # rounds with rejected uploads or skipped
    bytes_by_site: dict[str, int] = field(default_factory=dict)  # each site's uploaded bytes over the run
    private: tuple[str, ...] = ()  # parameters the sharing policy kept at the sites
    secure_rounds: list[dict] = field(default_factory=list)  # secure aggregation: each round's facts (threshold, drops)


def round_notes(history) -> list[dict]:
    """The rounds worth telling a reader about: uploads the server refused, sites that sent
    nothing (``missing``: site -> why), rounds skipped."""
    notes = []
    for r in history:
        if r.rejected or r.skipped or r.missing:
            note = {"round": r.round, "rejected": dict(r.rejected), "skipped": r.skipped}
            if r.missing:
                note["missing"] = dict(r.missing)
            notes.append(note)
    return notes


def _rise_cause(config: ExperimentConfig, method: str) -> str:
    """What to try when a setting's training loss rose: under DP the noise is the likelier cause."""
    lr = f"the learning rate ({config.training.lr:g}) may be too large"
    p = config.privacy
    if p.dp == "none" or method in ("single", "cross", "mix"):
        return lr
    noise = "the noise multiplier" if p.target_epsilon is None else f"the noise a target epsilon of {p.target_epsilon:g} needs"
    return f"{noise} may be too large for this model (a larger budget, clip or cohort lowers it), or {lr}"


def federated_history(spec: Method, repeat: int, run: FederatedRun, config: ExperimentConfig) -> History:
    """The record of one federated run: losses, bytes, per-round evaluations and round notes.
    A pretraining phase's rounds count in the communication rounds and bytes; the losses and
    evaluations are the method's own rounds'."""
    rounds = spec.rounds(config.training)
    uploads = [*run.pretraining, *run.history]
    return History(
        spec.display, repeat, run.train_loss, sum(r.bytes_up for r in uploads), rounds + len(run.pretraining),
        max(1, config.training.rounds * config.training.local_steps // rounds),
        [{"round": r.round, **({"test_auc": {site: m["auc"] for site, m in r.evaluation.items()}}
                                if all("auc" in m for m in r.evaluation.values()) else {}),
          "test_metrics": r.evaluation} for r in run.history if r.evaluation],
        round_notes(run.history),
        _bytes_by_site(uploads),
        run.private,
        [{"round": r.round, "skipped": r.skipped, **r.secure} for r in run.history if r.secure],
    )


def _bytes_by_site(history) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in history:
        for site, n in r.bytes_by_site.items():
            total[site] = total.get(site, 0) + n
    return total


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
    methods: list[tuple[Method, dict]]
    workers: int = 1
    models: list[ModelOutcome] = field(default_factory=list)  # with save_model: repeat 1's models
    privacy: list[dict] = field(default_factory=list)  # the DP ledger of every repeat
    harmonization: list[dict] = field(default_factory=list)  # with [harmonize]: each repeat's site effect
    target_scales: list[list[dict]] = field(default_factory=list)  # regression: each repeat's target scales


def load_federation(spec: DataSpec) -> Federation:
    """The federation a data spec names: an embedded data set or a table file; its task the
    one ``spec.task`` names (a table's label column is read as it; other sources must match)."""
    check_task(spec.task)
    federation = _load_federation(spec)
    if spec.task is not None and federation.task != spec.task:
        raise ConfigError(f"--task {spec.task}: the data {federation.name!r} hold {federation.task} targets; "
                          "leave --task out or choose data (or a data set option) of that task")
    return federation


def _load_federation(spec: DataSpec) -> Federation:
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
            # a "mask" column alone does not make a segmentation task: manifests often list brain masks for skull
            # stripping; masks are the targets only when named or when the task is segmentation
            mask_column=spec.mask_column or ("mask" if spec.task == "segmentation" else None),
            label_column=spec.label_column or "label",
            site_column=spec.site_column or "site",
            split_column=spec.split_column,
            positive_label=spec.positive_label,
            kind=spec.kind,
            skip_bad=spec.skip_bad,
            unlabeled_value=spec.unlabeled_value,
        )
    from medfed.data.tables import load_table

    return load_table(
        spec.path,
        site_column=spec.site_column,
        label_column=spec.label_column,
        label_columns=spec.label_columns,
        label_column_site=spec.label_column_site,
        split_column=spec.split_column,
        features=spec.features,
        impute=spec.impute,
        positive_label=spec.positive_label,
        exclude=spec.exclude,
        categorical=spec.categorical,
        covariates=spec.covariates,
        task=spec.task,
        unlabeled_value=spec.unlabeled_value,
    )


def training_rows(site, index: int, config: ExperimentConfig, repeat: int) -> np.ndarray:
    """A site's training-row mask in ``repeat``: its predefined split, else a stratified split
    drawn from the stream of the site's ``index`` (its position in the federation; a deployed
    site gets it from ``[deploy] sites``), by class or, for a regression target, by its
    quantile bin (:func:`medfed.data.tasks.strata`). Test rows are drawn from the labeled rows
    only: an unlabeled row is always a training row."""
    labeled = site.labeled
    if site.split is not None:
        return site.split | ~labeled
    train = np.ones(site.n, dtype=bool)
    train[labeled] = stratified_split(strata(site.task, site.y[labeled]), config.test_fraction,
                                      KeyedRng(config.seed, (SPLIT_STREAM, repeat)).child(index).generator)
    return train


def labeled_fraction(config: ExperimentConfig, site: str) -> float:
    """The share of ``site``'s training labels a study keeps ([data] labeled_fraction[_site])."""
    return config.data.labeled_fraction_site.get(site, config.data.labeled_fraction)


def labeled_training_rows(site, train: np.ndarray, config: ExperimentConfig, repeat: int) -> np.ndarray:
    """Which of ``site``'s rows train with their label in ``repeat``: its labeled training rows,
    less the (1 - F) share hidden by a seeded draw stratified like the split
    (:func:`~medfed.experiments.splits.kept_labels`), keyed by the repeat and the site's name so
    that the same F hides the same rows whatever the order of sites. F = 1 hides nothing."""
    rows = train & site.labeled
    fraction = labeled_fraction(config, site.name)
    if fraction == 1:
        return rows
    at = np.flatnonzero(rows)
    rng = KeyedRng(config.seed, (SPLIT_STREAM, repeat, name_key("labeled-fraction"), name_key(site.name)))
    kept = np.zeros(site.n, dtype=bool)
    kept[at[kept_labels(strata(site.task, site.y[at]), fraction, rng.generator)]] = True
    return kept


def prepare_site(site, train: np.ndarray, fed: Federation, config: ExperimentConfig, known=None,
                 labeled: np.ndarray | None = None) -> SplitSite:
    """One site's rows of a repeat, split by ``train`` (``labeled``: those of them that train with
    their label, default every labeled one; the other training rows are ``X_unlabeled``):
    categorical test levels outside ``known`` (the levels some site's training rows hold) zeroed
    and counted, missing values imputed from the site's labeled training rows, per-site scaling
    applied; its labeled training moments for global scaling."""
    known = known or {}
    labeled = train & site.labeled if labeled is None else labeled
    unlabeled = train & ~labeled
    X_train, X_test, X_unlabeled = site.X[labeled], site.X[~train], site.X[unlabeled]
    X_test, unseen = keep_training_levels(X_test, fed.categorical, known)
    X_unlabeled, _ = keep_training_levels(X_unlabeled, fed.categorical, known)
    imputer = scaler = None
    if not fed.is_image and fed.impute is not None:
        imputer = Imputer.fit(X_train, fed.impute, site=site.name, feature_names=fed.feature_names)
        X_train, X_test, X_unlabeled = imputer(X_train), imputer(X_test), imputer(X_unlabeled)
    if config.scaling == "site":
        scaler = Standardizer.from_moments([Moments.of(X_train)])
        X_train, X_test, X_unlabeled = scaler(X_train), scaler(X_test), scaler(X_unlabeled)
    y = site.y.astype(np.float64)
    preserved = config.data.covariates or () if config.harmonize.method != "none" else ()
    C = np.column_stack([site.covariates[c] for c in preserved] or [np.empty((site.n, 0))])
    return SplitSite(site.name, X_train, y[labeled], X_test, y[~train], Moments.of(X_train), unseen,
                     imputer, scaler, known, C[labeled], C[~train],
                     target_moments(y[labeled]) if fed.task == "regression" else None,
                     X_unlabeled, int((train & site.labeled & ~labeled).sum()))


def prepare_repeat(fed: Federation, config: ExperimentConfig, repeat: int) -> list[SplitSite]:
    """Split and impute every site for one repeat; randomness keyed by (repeat, site).

    Categorical columns keep the levels some site's training rows hold (the union is a setup
    exchange of level names); a test row with another level gets all-zero indicators and is
    counted in ``SplitSite.unseen_levels``.
    """
    trains = [training_rows(site, i, config, repeat) for i, site in enumerate(fed.sites)]
    labeled = [labeled_training_rows(site, t, config, repeat) for site, t in zip(fed.sites, trains)]
    known = training_levels(fed.categorical, [s.X[t] for s, t in zip(fed.sites, labeled)]) if fed.categorical else {}
    return [prepare_site(site, train, fed, config, known, rows) for site, train, rows in zip(fed.sites, trains, labeled)]


def check_labeled_fractions(config: ExperimentConfig, federation: Federation) -> None:
    """Before anything trains: ``labeled_fraction_site`` names sites of the federation, and no
    site is left without a labeled training row in any repeat."""
    unknown = [s for s in config.data.labeled_fraction_site if s not in federation.site_names]
    if unknown:
        raise ConfigError(f"--labeled-fraction-site {unknown[0]}=... (data.labeled_fraction_site): no site "
                          f"{unknown[0]!r}; sites are {', '.join(federation.site_names)}")
    for repeat in range(config.repeats):
        for i, site in enumerate(federation.sites):
            train = training_rows(site, i, config, repeat)
            if not labeled_training_rows(site, train, config, repeat).any():
                fraction = labeled_fraction(config, site.name)
                which = (f"--labeled-fraction-site {site.name}={fraction:g}" if site.name in config.data.labeled_fraction_site
                         else f"--labeled-fraction {fraction:g}")
                raise ConfigError(f"{which} leaves site {site.name!r} no labeled training row (of "
                                  f"{int((train & site.labeled).sum())} in repeat {repeat + 1}); raise the fraction")


class ScaledViews:
    """Standardized views of a repeat's sites for a given set of training sites (cached).

    With ``scaling = "global"`` a model is standardized with the statistics of the data it
    learns from, assembled from those sites' moments; the same transform applies to every
    test set it is evaluated on (as a deployed model would apply it).

    With ``standardize_target`` (regression) the training targets of ``group`` are standardized
    by :meth:`target_scale`, from the same sites' target moments; test targets stay as they are,
    and a model's predictions are mapped back with the same scale before they are scored.
    """

    def __init__(self, sites: list[SplitSite], mode: str, harmonizer=None, standardize_target: bool = False) -> None:
        self.sites, self.mode, self.harmonizer = sites, mode, harmonizer
        self.standardize_target = standardize_target
        self._cache: dict[tuple, tuple[list[LocalData], list[np.ndarray]]] = {}
        self._targets: dict[tuple[int, ...], TargetScale] = {}

    def target_scale(self, group: tuple[int, ...]) -> TargetScale:
        """The target scale of a model trained on ``group`` (``UNSCALED`` when standardization is off)."""
        if not self.standardize_target:
            return UNSCALED
        if group not in self._targets:
            self._targets[group] = TargetScale.of([self.sites[i].target_moments for i in group])
        return self._targets[group]

    def target_record(self) -> list[dict]:
        """Every target scale this repeat trained with: its training sites, rows, mean and std."""
        return [{"train_sites": [self.sites[i].name for i in group],
                 "n": sum(self.sites[i].target_moments.n for i in group), "mean": t.mean, "std": t.std}
                for group, t in self._targets.items()]

    def sites_for(self, reference: tuple[int, ...] | None, adapt: bool) -> list[SplitSite]:
        """The repeat's sites, harmonized (``medfed.experiments.harmonization``) by the fit of
        ``reference`` (default: every site; the same fit for every setting) when it is on."""
        if self.harmonizer is None:
            return self.sites
        return self.harmonizer(tuple(range(len(self.sites))) if reference is None else reference, adapt)

    def scaler(self, group: tuple[int, ...], reference: tuple[int, ...] | None = None,
               adapt: bool = False) -> Standardizer:
        """The standardization of a model trained on ``group``, applied to every row it scores."""
        sites = self.sites_for(reference, adapt)
        if self.mode == "global":
            return Standardizer.from_moments([sites[i].moments for i in group])
        # "site" was applied in prepare_repeat; "none" leaves values as they are
        return Standardizer.identity(sites[0].X_train.shape[1])  # features, or channels

    def __call__(self, group: tuple[int, ...], reference: tuple[int, ...] | None = None,
                 adapt: bool = False) -> tuple[list[LocalData], list[np.ndarray]]:
        """Training data of ``group`` and every site's test rows, standardized for ``group``;
        harmonized by the fit of ``reference`` with a site outside it as it is, or (``adapt``)
        harmonized by itself."""
        key = (group, reference, adapt)
        if key not in self._cache:
            sites = self.sites_for(reference, adapt)
            scale = self.scaler(group, reference, adapt)
            target = self.target_scale(group)
            train = [LocalData(sites[i].name, scale(sites[i].X_train),
                               target.forward(sites[i].y_train) if self.standardize_target else sites[i].y_train,
                               unlabeled_view(sites[i].X_unlabeled, scale))
                     for i in group]
            tests = [scale(s.X_test) for s in sites]
            self._cache[key] = (train, tests)
        return self._cache[key]


def unlabeled_view(X: np.ndarray | None, scale: Standardizer) -> np.ndarray | None:
    """A site's unlabeled training rows (``SplitSite.X_unlabeled``) scaled as its labeled ones, None
    when it has none (check_study refuses a method that learns from them under harmonization, which
    adjusts X_train only); a deployed site builds its ``LocalData`` with it too."""
    return None if X is None or len(X) == 0 else scale(X)


# which training rows a model's decision threshold is chosen on (medfed.experiments.metrics)
THRESHOLD_ROWS = {
    "site": "the test site's own training rows",
    "model": "the training rows the model was fitted on",
    "pooled": "the training sites' pooled training rows (the test site took no part in training)",
}


@dataclass(frozen=True)
class Evaluation:
    """One model scored on one site's test rows in one repeat: its table key (setting, method,
    train site, test site, evaluation, model kind), its metrics or why it has none, the test
    labels and probabilities (for the ROC plot) and the decision threshold, with
    ``threshold_rows`` saying where it was chosen (a key of :data:`THRESHOLD_ROWS`). A
    segmentation model keeps the masks and probabilities of :func:`example_rows` only, with
    those test ``images`` (unscaled), for the overlay plots."""

    key: tuple[str, str, str | None, str, str, str]
    result: dict[str, Metric] | Failure
    scores: tuple[np.ndarray, np.ndarray] | None = None
    threshold: Threshold | None = None
    threshold_rows: str | None = None
    images: np.ndarray | None = None


@dataclass
class RepeatOutcome:
    """What one repeat produced, in the order a serial run would produce it."""

    evaluations: list[Evaluation]
    histories: list[History]
    single_class_sites: list[str]
    setting_time: dict[str, float]
    # (method, train site, start, end): a model whose training loss rose far above its start;
    # "single" stands for the one per-site model Single and Cross share
    loss_rises: list[tuple[str, str | None, float, float]] = field(default_factory=list)
    unseen_levels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # site -> column -> level -> rows
    privacy: list[dict] = field(default_factory=list)  # the DP ledger: one entry per site per federated run
    models: dict[str, ModelOutcome] = field(default_factory=dict)  # with save_model, in repeat 1: by name
    harmonization: dict | None = None  # with [harmonize]: the site effect before and after
    target_scales: list[dict] = field(default_factory=list)  # regression: ScaledViews.target_record
    # site -> (unlabeled training rows, of them hidden by the labeled fraction), for sites that have any
    unlabeled: dict[str, tuple[int, int]] = field(default_factory=dict)


CROSS_ONE_SITE = "Cross trains on one site and tests on another; this federation has a single site"


def run_repeat(
    config: ExperimentConfig,
    federation: Federation,
    methods: list[tuple[Method, dict]],
    repeat: int,
    progress: Callable[[str], None] | None = None,
) -> RepeatOutcome:
    """One repeat: split, then train and evaluate every setting. Pure in (config, data, repeat)."""
    plan = TrainingPlan.of(config, federation)
    model = plan.model
    task, classes = federation.task, federation.classes
    rule = config.evaluation.threshold
    site_names = federation.site_names
    n_sites = len(site_names)
    everyone = tuple(range(n_sites))
    sites = prepare_repeat(federation, config, repeat)
    harmonizer = repeat_harmonizer(config, federation, sites)
    scaled = ScaledViews(sites, config.scaling, harmonizer,
                         standardize_target=task == "regression" and config.data.standardize_target)
    initial = plan.initial(federation, repeat)
    out = RepeatOutcome([], [], [s.name for s in sites if s.single_class], {},
                        unseen_levels={s.name: s.unseen_levels for s in sites if s.unseen_levels},
                        unlabeled={s.name: (len(s.X_unlabeled), s.n_hidden) for s in sites if len(s.X_unlabeled)})
    if harmonizer is not None:
        from medfed.experiments.harmonization import site_effect

        seed = int(KeyedRng(config.seed, (SPLIT_STREAM, repeat, name_key("site-effect"))).generator.integers(2**31))
        out.harmonization = {"before": site_effect(sites, seed), "after": site_effect(scaled.sites_for(None, False), seed),
                             **harmonizer.repeat_report(everyone)}
    single_models: dict[int, CentralFit] = {}
    saving = config.save_model and repeat == SAVED_REPEAT
    # Single and Cross score with one model per training site, saved once as Single-<site>
    per_site = [spec.display for spec, _ in methods if spec.name in ("single", "cross")]

    def keep(name: str, spec: Method, params, group: tuple[int, ...], reason: str | None = None) -> None:
        """With ``save_model``, repeat 1's model of a setting as its file, or why it has none."""
        if not saving or name in out.models:
            return
        one_site = spec.name in ("single", "cross")
        saved = None
        if reason is None:
            # the decision thresholds its rows were scored at: a federated model's per training site
            train = scaled(group)[0]
            thresholds = None if task != "binary" else (
                {d.name: model_threshold(rule, model, params, d.X, d.y) for d in train}
                if spec.kind == "federated" else
                {MODEL_ROWS: model_threshold(rule, model, params, *_pooled_rows(train))})
            saved = saved_model_file(
                config, federation, sites, scaled.scaler(group), params,
                setting="Single" if one_site else spec.display, method="single" if one_site else spec.name,
                train_sites=[site_names[i] for i in group], settings=per_site if one_site else [spec.display],
                personal=spec.personal, thresholds=thresholds, target=scaled.target_scale(group),
            )
        out.models[name] = ModelOutcome(name, saved, reason)

    def key_of(spec: Method, train_site: str | None, j: int, evaluation: str = "split", model_kind: str = "global"):
        return (spec.display, spec.name, train_site, site_names[j], evaluation, model_kind)

    def predictions(params, X: np.ndarray, group: tuple[int, ...]) -> np.ndarray | None:
        """:func:`task_scores`; a regression model's mapped back from the scale of ``group``'s targets."""
        predicted = task_scores(model, params, X)
        return predicted if predicted is None or task != "regression" else scaled.target_scale(group).inverse(predicted)

    def evaluate_on(key, params, tests, j: int, failure: Failure | None, rows: str, calibration: list[LocalData],
                    group: tuple[int, ...]) -> None:
        """Score ``params``, trained on ``group``, on site ``j``'s test rows at the threshold chosen
        on ``calibration`` (pooled), the training rows ``rows`` names (a key of THRESHOLD_ROWS); a
        multiclass or regression model has no threshold."""
        if failure is None and task != "binary":
            predicted = predictions(params, tests[j], group)
            if predicted is not None:
                y, images = sites[j].y_test, None
                metrics = task_metrics(task, y, predicted, classes)
                if task == "segmentation":
                    rows = example_rows(y)
                    y, predicted, images = y[rows], predicted[rows], sites[j].X_test[rows]
                out.evaluations.append(Evaluation(key, metrics, (y, predicted), images=images))
                return
            failure = Failure("diverged", "diverged: the model's scores on the test rows are NaN/Inf")
        if failure is None:
            scores = model_scores(model, params, tests[j])
            if scores is not None:
                probabilities = scores[0]
                threshold = model_threshold(rule, model, params, *_pooled_rows(calibration))
                out.evaluations.append(Evaluation(key, thresholded_metrics(sites[j].y_test, *scores, threshold),
                                                  (sites[j].y_test, probabilities), threshold, rows))
                return
            failure = Failure("diverged", "diverged: the model's scores on the test rows are NaN/Inf")
        out.evaluations.append(Evaluation(key, failure))

    def train_one_federated(spec: Method, opts: dict, held_out: int | None) -> None:
        """Train ``spec`` on every site (``held_out`` None) or on all but one, and evaluate."""
        group = tuple(i for i in everyone if i != held_out)
        reference = None if held_out is None else group  # an unseen site takes no part in the fit
        train, tests = scaled(group, reference)
        evaluate = None
        if config.eval_every and held_out is None and spec.global_model:  # FedBN's shared part is no model
            def evaluate(p, tests=tests, train=train):  # each site's threshold from its own training rows
                if task != "binary":
                    return {s.name: task_round_metrics(task, classes, s.y_test, predictions(p, tests[j], group))
                            for j, s in enumerate(sites)}
                return {s.name: round_metrics(s.y_test, model_scores(model, p, tests[j]),
                                              model_threshold(rule, model, p, train[j].X, train[j].y))
                        for j, s in enumerate(sites)}
        key = (TRAIN_STREAM, repeat, name_key(spec.name)) + (() if held_out is None else (name_key("loso"), held_out))
        try:
            run = plan.federated(spec, opts, train, initial, KeyedRng(config.seed, key), evaluate=evaluate,
                                 run_key=f"r{repeat + 1}-{spec.name}" + ("" if held_out is None else f"-loso-{held_out}"))
        except MedfedError as exc:
            # a round the method's own rules refused (the study check catches what it can up front):
            # this setting has no result in this repeat; the other settings still run
            failure = Failure("not computable", f"the run stopped: {exc}")
            if held_out is not None:
                for evaluation in ("loso", "loso+adapt")[: 1 + (harmonizer is not None)]:
                    out.evaluations.append(Evaluation(key_of(spec, None, held_out, evaluation), failure))
                return
            keep(spec.display, spec, None, group, failure.reason)
            kinds = ["global"] * spec.global_model + ["personal"] * (spec.personal or not spec.global_model)
            for j in range(n_sites):
                for kind in kinds:
                    out.evaluations.append(Evaluation(key_of(spec, None, j, model_kind=kind), failure))
            return
        ledger = plan.ledger(spec, [d.name for d in train], repeat, {d.name: d.n for d in train})
        if held_out is not None:
            for entry in ledger:
                entry["setting"] = f"{spec.display} (LOSO: {site_names[held_out]} left out)"
        out.privacy.extend(ledger)
        failure = federated_failure(run)
        if held_out is not None:
            evaluate_on(key_of(spec, None, held_out, "loso"), run.params, tests, held_out, failure, "pooled", train, group)
            if harmonizer is not None:
                evaluate_on(key_of(spec, None, held_out, "loso+adapt"), run.params,
                            scaled(group, group, adapt=True)[1], held_out, failure, "pooled", train, group)
            return
        losses = run.train_loss
        finite = losses[np.isfinite(losses)]
        if failure is None and finite.size and loss_rise(finite[0], finite[-1]):
            out.loss_rises.append((spec.name, None, float(finite[0]), float(finite[-1])))
        out.histories.append(federated_history(spec, repeat, run, config))
        keep(spec.display, spec, run.params, group, _reason(failure) if spec.global_model else (
            f"no global model: {spec.display} shares only part of the model; each site's personal model stays "
            "at the site"))
        for j in range(n_sites):
            if spec.global_model:
                evaluate_on(key_of(spec, None, j), run.params, tests, j, failure, "site", [train[j]], group)
            if site_names[j] in run.personal:
                personal = run.personal[site_names[j]]
                evaluate_on(key_of(spec, None, j, model_kind="personal"), personal, tests, j,
                            failure or (None if _all_finite(personal) else Failure(
                                "diverged", "diverged: the personal model's parameters hold NaN/Inf")),
                            "site", [train[j]], group)

    def centralized(method: str, train_site: str | None, data: LocalData, rng: KeyedRng) -> CentralFit:
        fit = plan.centralized(data, initial, rng)
        if centralized_failure(fit) is None and loss_rise(fit.start_loss, fit.end_loss):
            out.loss_rises.append((method, train_site, fit.start_loss, fit.end_loss))
        return fit

    def single_model(i: int) -> CentralFit:
        if i not in single_models:
            train, _ = scaled((i,))
            rng = KeyedRng(config.seed, (TRAIN_STREAM, repeat, name_key("single"), i))
            single_models[i] = centralized("single", site_names[i], train[0], rng)
        return single_models[i]

    for spec, opts in methods:
        if progress:
            progress(f"repeat {repeat + 1}/{config.repeats}: {spec.display}")
        tic = time.perf_counter()
        if spec.name == "cross" and n_sites == 1:
            out.evaluations.append(Evaluation(key_of(spec, None, 0), Failure("not computable", CROSS_ONE_SITE)))
        elif spec.name in ("single", "cross"):
            for i, s in enumerate(sites):
                targets = [i] if spec.name == "single" else [j for j in range(n_sites) if j != i]
                if s.single_class:
                    failure = Failure("not computable", f"training rows of site {s.name!r} hold one class only")
                    for j in targets:
                        out.evaluations.append(Evaluation(key_of(spec, s.name, j), failure))
                    keep(f"Single-{s.name}", spec, None, (i,), failure.reason)
                    continue
                fit = single_model(i)
                failure = centralized_failure(fit)
                own_rows, tests = scaled((i,))
                for j in targets:
                    evaluate_on(key_of(spec, s.name, j), fit.params, tests, j, failure, "model", own_rows, (i,))
                keep(f"Single-{s.name}", spec, fit.params, (i,), _reason(failure))
        elif spec.name == "mix":
            for held_out in [None, *(range(n_sites) if config.loso else [])]:
                group = tuple(i for i in everyone if i != held_out)
                reference = None if held_out is None else group
                train, tests = scaled(group, reference)
                pooled = LocalData("pooled", np.concatenate([d.X for d in train]), np.concatenate([d.y for d in train]))
                key = (TRAIN_STREAM, repeat, name_key("mix")) + (() if held_out is None else (name_key("loso"), held_out))
                fit = centralized("mix", None, pooled, KeyedRng(config.seed, key))
                failure = centralized_failure(fit)
                if held_out is None:
                    keep(spec.display, spec, fit.params, group, _reason(failure))
                for j in range(n_sites) if held_out is None else [held_out]:
                    evaluation = "split" if held_out is None else "loso"
                    evaluate_on(key_of(spec, None, j, evaluation), fit.params, tests, j, failure, "model", [pooled], group)
                if held_out is not None and harmonizer is not None:
                    evaluate_on(key_of(spec, None, held_out, "loso+adapt"), fit.params,
                                scaled(group, reference, adapt=True)[1], held_out, failure, "model", [pooled], group)
        else:
            loso = config.loso and spec.global_model  # an unseen site has no private part to use
            for held_out in [None, *(range(n_sites) if loso else [])]:
                train_one_federated(spec, opts, held_out)
        out.setting_time[spec.display] = time.perf_counter() - tic
    out.target_scales = scaled.target_record()
    return out


def repeat_harmonizer(config: ExperimentConfig, federation: Federation, sites: list[SplitSite]):
    """The repeat's harmonization (``[harmonize]``), or None when it is off."""
    if config.harmonize.method == "none":
        return None
    from medfed.experiments.harmonization import make_harmonizer

    return make_harmonizer(config, federation, sites)


def _repeat_task(config: ExperimentConfig, federation: Federation, repeat: int) -> RepeatOutcome:
    # method specs hold functions that do not pickle; the worker resolves the names itself
    return run_repeat(config, federation, resolve_methods(config.methods, config.method_options, config.pipelines), repeat)


def _parallel_outcomes(config, federation, workers, progress):
    """Repeats in forked worker processes that end with the parent; results come back in
    repeat order."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
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


# the options a site-count requirement depends on (medfed.server.robust.site_requirement)
_SITE_COUNT_OPTIONS = ("f", "beta", "m")


def _option_fix(method: str, option: str) -> str:
    """How a user sets ``option`` of ``method``: its flag where the option declares one."""
    flag = METHOD_FLAGS[option].flag if option in METHOD_FLAGS else f"--method-option {method}.{option}"
    return f"{flag} ({method}.{option})"


def check_secure_study(config: ExperimentConfig) -> None:
    """What cannot apply to masked uploads, refused in one line naming the flag: the server's
    screening by norm (the site's own clip bounds each upload instead, and a site will not mask
    a non-finite one) and compression other than quantization in the ring (q8, q4)."""
    if not config.privacy.secure_aggregation:
        return
    from medfed.comm.secure import quantization_bits

    if config.training.max_update_norm is not None:
        raise ConfigError(
            "--max-update-norm cannot run with --secure-aggregation: the server never sees an upload's norm; "
            "each site's update is clipped to --clip C before masking instead")
    if quantization_bits(config.compress) and config.privacy.dp in ("client", "distributed"):
        # the noise is sized for updates of norm C; rounding every entry to a step of 2C/L can add
        # up to sqrt(n) 2C/L to that norm, and the server, seeing only the sum, cannot clip again
        # (without secure aggregation it does); with --dp distributed the sites' rounding also
        # comes after their noise, which no accountant here covers
        raise ConfigError(
            f"--compress {config.compress} with --dp {config.privacy.dp} cannot run with --secure-aggregation: "
            "rounding in the ring can carry a clipped update past the clip the noise is sized for, and the "
            "server cannot clip what it cannot see; use --compress none, or DP without secure aggregation")


def check_task_study(config: ExperimentConfig, federation: Federation, methods: list[tuple[Method, dict]]) -> None:
    """Refuse, in one line before training, what assumes two classes on another task: a method
    that declares the tasks it trains (FedSLD's two-class label counts), a decision threshold rule."""
    from medfed.models.registry import task_model

    task = federation.task
    if task == "binary":
        return
    task_model(config.model, task)  # a model the task cannot train, before any method's view of it
    for spec, _ in methods:
        if task not in spec.tasks:
            raise ConfigError(f"method {spec.name!r} trains {' or '.join(spec.tasks)} tasks; these data are {task} "
                              f"({federation.task_source}): leave it out of --methods")
    if config.evaluation.threshold != "0.5":
        raise ConfigError(f"--threshold {config.evaluation.threshold} chooses a binary decision threshold; a {task} "
                          "task has none: leave --threshold out")


def check_pretraining(config: ExperimentConfig, spec: Method) -> None:
    """Refuse a method with a pretraining phase (contrastive) for a model it cannot pretrain, and
    with DP or secure aggregation (its pretraining uploads are neither accounted nor masked)."""
    from medfed.client.contrastive import pretraining_refusal

    refusal = pretraining_refusal(config.model)
    if refusal is not None:
        raise ConfigError(f"method {spec.name!r} pretrains the model's encoder, but {refusal}: use --model cnn2d")
    if config.privacy.dp != "none" or config.privacy.secure_aggregation:
        raise ConfigError(f"method {spec.name!r}: its pretraining uploads are not privacy-accounted or masked; "
                          "leave it out of --methods or run without --dp and secure aggregation")


def check_unlabeled_study(config: ExperimentConfig, methods: list[tuple[Method, dict]]) -> None:
    """Refuse, before training, what a method that learns from unlabeled rows cannot combine with:
    harmonization (it adjusts the labeled rows only) and DP-SGD (pseudo-labeled rows are not
    accounted as the site's examples)."""
    for spec, opts in methods:
        if not spec.uses_unlabeled(opts):
            continue
        if spec.pretrain is not None:
            check_pretraining(config, spec)
        if config.harmonize.method != "none":
            raise ConfigError(f"method {spec.name!r} learns from unlabeled rows, which [harmonize] method = "
                              f"{config.harmonize.method!r} does not adjust: leave it out of --methods or harmonize none")
        if config.privacy.dp == "sample":
            raise ConfigError(f"method {spec.name!r} trains on pseudo-labeled rows that --dp sample does not "
                              "account as the site's examples: leave it out of --methods or use another --dp")


def check_teacher_study(config: ExperimentConfig, federation: Federation | None, methods: list[tuple[Method, dict]]) -> None:
    """Refuse, before training, a distilling method's teacher that does not fit the data or the
    student (:func:`check_teacher_fit`), and what the soft targets do not combine with (a robust
    loss, DP-SGD: its soft targets are not a row's label). ``federation`` None (a deployed study's
    coordinator, which never reads the teacher): all but the file's fit, which each site checks on
    its own copy (medfed.deploy.site)."""
    from medfed.client.distill import TEACHER_NEEDED

    for spec, opts in methods:
        if "teacher" not in opts:
            continue
        if not str(opts["teacher"]).strip():
            raise ConfigError(TEACHER_NEEDED)
        if config.training.loss != "ce":
            raise ConfigError(f"method {spec.name!r} replaces the loss itself: use --loss ce, not --loss {config.training.loss}")
        if federation is not None:
            check_teacher_fit(opts["teacher"], config, federation)
        if config.privacy.dp == "sample":
            raise ConfigError(f"method {spec.name!r} does not combine with --dp sample: use another --dp")


def check_teacher_fit(path, config: ExperimentConfig, federation: Federation) -> None:
    """A teacher file fits: a torch state dict holds the study's model's parameters (names and
    shapes), a saved medfed model the data's features, task and classes; else one ConfigError."""
    from medfed.experiments.saved_model import check_state_dict, check_teacher, is_state_dict, read_state_dict

    if is_state_dict(path):
        student = TrainingPlan.of(config, federation).model
        shapes = (student.param_shapes(federation.sample_shape) if hasattr(student, "param_shapes") else
                  {k: v.shape for k, v in student.init_params(federation.sample_shape).items()})
        check_state_dict(path, read_state_dict(path), shapes, config.model)
    else:
        check_teacher(path, federation)


CROSS_SITE_LIMIT = 200  # beyond it, Cross's K (K - 1) evaluations take gigabytes


def check_study(
    config: ExperimentConfig,
    federation: Federation,
    methods: list[tuple[Method, dict]],
    *,
    site_requirements: bool = True,
) -> None:
    """Everything about the study that would fail mid-run, refused before any training.

    Every federated method is built for the sites it will train on (all of them, and all but
    one under ``loso``), so a bad option value fails here with the method's own message; a rule
    that needs more sites per round than the federation gives (Krum, Bulyan, a trimmed mean
    that cuts everything) is refused with the fix (unless ``site_requirements`` is False: the
    robustness audit records such a defense as not computable instead); ``min_sites`` must fit
    the training sites.
    """
    from medfed.engine.selection import cohort_size
    from medfed.server.robust import site_requirement

    from medfed.experiments.harmonization import check_harmonization

    names = list(federation.site_names)
    t = config.training
    check_task_study(config, federation, methods)
    if hasattr(federation, "sites"):  # the data themselves (a deployed study's coordinator has their summaries)
        check_labeled_fractions(config, federation)
    check_unlabeled_study(config, methods)
    check_teacher_study(config, federation, methods)
    cross = [spec.name for spec, _ in methods if spec.name == "cross"]
    if cross and len(names) > CROSS_SITE_LIMIT:
        # every site's Single model scored on every other site: K (K - 1) evaluations held in memory
        # (1,000 sites: 10^6 of them, past 9 GB), more than any table can show
        raise ConfigError(
            f"Cross scores each site's model on every other site: {len(names)} sites make "
            f"{len(names) * (len(names) - 1):,} model-site pairs (at most {CROSS_SITE_LIMIT} sites); "
            "list --methods without cross (e.g. single,mix,fedavg)")
    faults = parse_drops(config.drop, names)
    check_secure_study(config)
    if faults.late and not config.privacy.secure_aggregation:
        raise ConfigError("--drop SITE@ROUND:STAGE drops a site inside a securely aggregated round; "
                          "without --secure-aggregation use SITE@ROUND")
    check_harmonization(config, federation)
    if config.executor not in LOCAL_EXECUTORS:
        raise ConfigError(
            f"executor {config.executor!r} runs on Flower's deployment runtime: `medfed run --executor flower` "
            "(a deployment on this machine, medfed.deploy.local) or `medfed deploy server` and `medfed deploy site`; "
            "the simulation harness runs on executor " + " or ".join(repr(e) for e in LOCAL_EXECUTORS)
        )
    if config.ray_address is not None and config.executor != "ray":
        raise ConfigError(f"--ray-address is the cluster of --executor ray; this study runs on {config.executor!r}")
    if config.executor == "ray":  # connected now, so that a cluster that refuses us stops the study before training
        connect_ray(config.ray_address)
        if resolve_workers(config.workers, config.repeats) > 1:
            raise ConfigError("--executor ray spreads the sites over Ray's workers itself: run repeats with --workers 1")
    if config.resume and config.out is None:
        raise ConfigError("--resume keeps checkpoints in the output folder: give --out DIR")
    if config.loso and len(names) < 2:
        raise ConfigError(f"leave-one-site-out (--loso) needs at least 2 sites; {federation.name!r} has {len(names)}")
    groups = [names] + ([names[1:]] if config.loso else [])  # the smallest training group under LOSO
    for group in groups:
        where = "" if len(group) == len(names) else f" (with --loso each model trains on {len(group)} sites)"
        if t.min_sites > len(group):
            raise ConfigError(
                f"min_sites is {t.min_sites}, but there are {len(group)} training sites{where}; "
                f"set --min-sites {len(group)} or lower"
            )
        cohort = cohort_size(len(group), t.fraction_fit, t.min_sites)
        if config.privacy.secure_aggregation and len(group) < 2:
            raise ConfigError(f"--secure-aggregation sums at least 2 sites' uploads; there are {len(group)} training "
                              f"site(s){where}")
        for spec, opts in methods:
            if spec.kind != "federated":
                continue
            try:
                built = build_method(config, spec, opts, group)
            except (ValueError, TypeError) as exc:  # a builder that does not speak ConfigError yet
                raise ConfigError(f"method {spec.name!r}: {exc}") from None
            if built.private is not None:  # partial sharing on a model without such parameters (FedBN, no norm)
                from medfed.client.sharing import check_split

                model = TrainingPlan.of(config, federation).model
                params = list(model.init_params(federation.sample_shape, KeyedRng(0)))
                check_split(spec.name, getattr(model, "name", config.model), params,
                            [p for p in params if built.private(p)])
            if config.privacy.dp == "sample":  # a site rule DP-SGD cannot make private yet
                from medfed.methods.privacy import check_sample_dp

                check_sample_dp(built, spec.name, TrainingPlan.of(config, federation).model, t.batch_size)
            if config.privacy.dp in ("client", "distributed"):  # a server that reads more than the noised mean
                from medfed.methods.privacy import client_dp

                built = client_dp(built, spec.name, clip=config.privacy.clip, noise_multiplier=0.0,
                                  sizes={name: 1.0 for name in group}, rate=t.fraction_fit, rng=KeyedRng(0),
                                  mode=config.privacy.dp)
            if config.privacy.secure_aggregation:  # a server that reads individual uploads
                from medfed.methods.privacy import check_secure

                check_secure(built, spec.name)
            if config.executor == "vectorized":  # a site rule the array program cannot batch
                from medfed.engine.executors.vectorized import check_vectorized

                check_vectorized(spec.name, built, TrainingPlan.of(config, federation).local,
                                 codec=make_codec(config.compress), secure=config.privacy.secure_aggregation,
                                 dp=config.privacy.dp)
            problem = site_requirement(spec.name, cohort, opts) if site_requirements else None
            if problem is not None:
                fixes = " or ".join(_option_fix(spec.name, k) for k in opts if k in _SITE_COUNT_OPTIONS)
                raise ConfigError(
                    f"method {spec.name!r}: {problem}{where}, per round {cohort} of {len(group)} sites; "
                    f"change {fixes or 'its options'} or use a federation with more sites"
                )


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
    check_study(config, federation, methods)
    workers = resolve_workers(config.workers, config.repeats)
    if workers > 1:
        outcomes = _parallel_outcomes(config, federation, workers, progress)
    else:
        outcomes = [run_repeat(config, federation, methods, r, progress) for r in range(config.repeats)]
    return assemble_run(config, federation, methods, outcomes, started, workers)


def unlabeled_notes(per_repeat: list[dict[str, tuple[int, int]]], methods: list[str],
                    learners: Sequence[str] = ()) -> list[str]:
    """The note saying how many training rows had no label, that the (supervised) ``methods``
    left them out and the semi-supervised ``learners`` learnt from them: per site, repeat 1's
    counts (the split is stratified, so they barely vary)."""
    first = next((u for u in per_repeat if u), None)
    if first is None:
        return []
    total = sum(n for n, _ in first.values())
    hidden = sum(h for _, h in first.values())
    sites = ", ".join(f"{name}: {n}" for name, (n, _) in first.items())
    why = f", {hidden} of them with their label hidden by the labeled fraction" if hidden else ""
    head = f"{total} unlabeled training rows ({sites}; repeat 1{why})"
    used = f"used by {', '.join(learners)} (semi-supervised)" if learners else ""
    if not methods:
        return [f"{head} {used}"]
    return [f"{head} not used by {', '.join(methods)}: supervised methods train on the labeled rows only"
            + (f"; {used}" if used else "")]


def assemble_run(config: ExperimentConfig, federation, methods, outcomes: list[RepeatOutcome], started: float,
                 workers: int = 1) -> ExperimentRun:
    """The run's table cells, histories and notes from its repeats' outcomes (simulated here, or
    reported by deployed sites); ``federation`` is the data or, deployed, what setup shared of it."""
    cells: dict[tuple, Cell] = {}
    notes: list[str] = []
    # every metric a row holds
    keys = metric_keys(getattr(federation, "task", "binary"), getattr(federation, "classes", ()))
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
    notes += unseen_level_notes([o.unseen_levels for o in outcomes], config.repeats)
    notes += unlabeled_notes([o.unlabeled for o in outcomes], [spec.display for spec, o in methods if not spec.uses_unlabeled(o)],
                             [spec.display for spec, o in methods if spec.uses_unlabeled(o)])
    for site, absent in (federation.missing_classes() if hasattr(federation, "missing_classes") else {}).items():
        notes.append(f"site {site!r} has no rows of class{'es' if len(absent) > 1 else ''} "
                     f"{', '.join(repr(c) for c in absent)} (legal: it trains on the classes it has; its "
                     "per-class sensitivity for them is undefined)")
    noted_sites: set[str] = set()
    rises: dict[str, list[tuple[int, float, float]]] = {}
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
        for e in outcome.evaluations:
            if e.key not in cells:
                cells[e.key] = Cell(*e.key, metrics={m: [] for m in keys})
            c, result = cells[e.key], e.result
            c.thresholds.append(e.threshold)
            c.threshold_rows = c.threshold_rows or e.threshold_rows
            if isinstance(result, Failure):
                for m in keys:
                    c.metrics[m].append(Metric(None, result.reason))
                c.skipped.append(result.reason)
                if result.kind == "diverged":
                    c.diverged.append({"repeat": repeat, "round": result.round, "reason": result.reason})
            else:
                for m in keys:
                    c.metrics[m].append(result[m])
                c.skipped.append(None)
                c.scores.append(e.scores)
                if e.images is not None:
                    c.images.append(e.images)
        for method, train_site, start, end in outcome.loss_rises:
            rises.setdefault((method, train_site), []).append((repeat, start, end))
        for name, seconds in outcome.setting_time.items():
            setting_time[name] += seconds
    display = {spec.name: spec.display for spec, _ in methods}
    for (method, train_site), cases in rises.items():
        ends = [end for _, _, end in cases]
        note = (
            f"the training loss ended above {LOSS_RISE_WARNING:g}x where it started in {len(cases)} of "
            f"{config.repeats} repeat(s) (from {cases[0][1]:.4g} to {min(ends):.4g}"
            + (f"-{max(ends):.4g}" if len(ends) > 1 else "")
            + f"); {_rise_cause(config, method)}"
        )
        shared = ("single", "cross") if method == "single" else (method,)  # Cross reuses Single's model
        label = display.get(method, display.get("cross", method)) + (f" ({train_site} tr)" if train_site else "")
        notes.append(f"{label}: {note}")
        for c in cells.values():
            if c.method in shared and c.train_site == train_site:
                c.warnings.append(note)
    models = list(outcomes[0].models.values())
    name_files(models)
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
        models=models,
        privacy=[entry for o in outcomes for entry in o.privacy],
        harmonization=[o.harmonization for o in outcomes if o.harmonization is not None],
        target_scales=[o.target_scales for o in outcomes],
    )
