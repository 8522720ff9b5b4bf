"""The coordinator of a deployed study: the same :class:`~medfed.engine.driver.Driver` as a
simulation, with the sites reached through a link (Flower's SuperLink in deployment).

1. **Setup exchange.** Unless the study's labels are binary whatever the files hold, every site
   first says which task its labels read as and which class names it holds; the federation's
   task and classes (their union, in the order ``medfed run`` gives the pooled data) go with the
   setup, so each site codes its labels alike. Every site of ``[deploy] sites`` receives the
   study and answers with its counts (of labeled and unlabeled training rows too), training-row
   moments and feature names (:mod:`medfed.deploy.site`); a site that lacks a distilling method's
   teacher file stops the study. A site
   whose file does not match the study's schema, or whose features differ from the others',
   is refused (logged, named in the results' warnings); the study goes on if ``min_sites``
   remain. With ``[harmonize]`` the statistics it needs follow (:func:`harmonize_exchange`)
   and each site adjusts its own rows; global scaling is then assembled from the moments of
   those rows, in ``[deploy] sites`` order.
2. **Rounds.** Each federated method runs as in ``medfed run`` (same keyed randomness, same
   server program), checkpointing after every round under ``OUT/.medfed-deploy/``;
   ``--resume`` continues from there bit-identically. A site that does not answer within
   ``round_timeout_s`` is missing from that round, with the reason, and is asked again next round.
3. **Federated evaluation.** Each site scores the final global model (and its personal model,
   which stays at the site) on its own test rows and sends metrics only.
4. **Report.** ``OUT`` gets what ``medfed run`` writes for one repeat (results.json, .csv,
   table.md), ``models/<Setting>.npz`` (the final global models) and ``status.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medfed.atomic import write_bytes_atomically
from medfed.comm.compress import make_codec
from medfed.comm.wire import WireError, decode, encode
from medfed.data.preprocess import Imputer, Moments, Standardizer
from medfed.data.tasks import UNSCALED, TargetScale, merged_classes, n_outputs
from medfed.deploy.study import load_study, site_min_sites, study_payload
from medfed.engine.checkpoint import CheckpointStore
from medfed.engine.driver import Driver
from medfed.engine.executors.remote import Link, RemoteExecutor
from medfed.engine.protocol import RoundContext, RoundRecord, ServerState, programs
from medfed.errors import ConfigError, DataError
from medfed.experiments.harness import (
    TRAIN_STREAM,
    Evaluation,
    Failure,
    RepeatOutcome,
    TrainingPlan,
    assemble_run,
    build_method,
    federated_failure,
    check_task_study,
    federated_history,
    study_fingerprint,
)
# deployed_report's module imports the harmonization statistics' wire types, which setup answers carry
from medfed.experiments.harmonization import deployed_report
from medfed.experiments.metrics import Metric, Threshold
from medfed.experiments.saved_model import ModelOutcome, saved_model_file
from medfed.methods import resolve_methods
from medfed.methods.method import context_for
from medfed.rng import KeyedRng, name_key

STATUS_FILE = "status.json"
CHECKPOINTS = ".medfed-deploy"


@dataclass(frozen=True)
class _SharedPreprocessing:
    """What a site shared of its preprocessing at setup, as a saved model records it."""

    name: str
    imputer: Imputer | None
    scaler: Standardizer | None
    known_levels: dict = field(default_factory=dict)

    @classmethod
    def of(cls, site: str, setup: Mapping[str, Any]) -> _SharedPreprocessing:
        imp, own = setup.get("imputer"), setup.get("site_scaler")
        return cls(site, None if imp is None else Imputer(imp["strategy"], np.asarray(imp["values"])),
                   None if own is None else Standardizer(np.asarray(own["mean"]), np.asarray(own["scale"])))


@dataclass(frozen=True)
class DeployedFederation:
    """What the coordinator knows of the federation: what the setup exchange shared."""

    name: str
    sites: tuple[str, ...]
    summaries: tuple[dict, ...]
    feature_names: tuple[str, ...]
    sample_shape: tuple[int, ...]
    impute: str | None
    positive_label: str | None
    has_predefined_split: bool
    description: str = "a deployed study: each site's rows stayed at the site"
    attribution: str = ""
    info: dict = field(default_factory=dict)
    categorical: tuple = ()  # refused in deployed studies for now (deploy.study)
    is_image: bool = False
    task: str = "binary"
    classes: tuple[str, ...] = ()
    task_source: str = "given"

    @property
    def site_names(self) -> list[str]:
        return list(self.sites)

    @property
    def n_classes(self) -> int | None:
        return n_outputs(self.task, self.classes)

    def missing_classes(self) -> dict[str, list[str]]:
        """Multiclass: each site lacking some class (legal, reported), from the class counts it shared."""
        if self.task != "multiclass":
            return {}
        return {s["name"]: absent for s in self.summaries
                if (absent := [c for c, k in s["class_counts"].items() if not k])}

    def site_summaries(self) -> list[dict]:
        return [dict(s) for s in self.summaries]


def _status(out: Path, **fields: Any) -> None:
    # informational, rewritten every round: atomic, but not worth a sync to disk
    write_bytes_atomically(out / STATUS_FILE, (json.dumps(fields, indent=1) + "\n").encode(), durable=False)


def setup_exchange(link: Link, config, log: Callable[[str], None]) -> tuple[dict[str, dict], dict[str, str]]:
    """Ask every listed site for its setup; the sites that joined (in ``[deploy] sites`` order)
    and why the others were refused."""
    names = list(config.deploy.sites)
    from medfed import __version__

    study = {"study": study_payload(config), "medfed_version": __version__}
    refused: dict[str, str] = {}
    agreed = {} if _known_binary(config) else labels_exchange(link, config, study, names, refused, log)
    request = encode({"op": "setup", **study, **agreed})
    # loading a site's file (an image manifest: many files) may take longer than a round
    answers = link.exchange({site: request for site in names if site not in refused}, config.deploy.join_timeout_s)
    joined: dict[str, dict] = {}
    for site in names:
        if site in refused:
            continue
        reply = _reply(answers, site, "setup")
        if isinstance(reply, str):
            refused[site] = reply
        else:
            joined[site] = dict(reply)
    if joined:
        first_site, first = next(iter(joined.items()))
        for site, reply in list(joined.items()):
            if reply["features"] != first["features"]:
                extra = [c for c in reply["features"] if c not in first["features"]]
                absent = [c for c in first["features"] if c not in reply["features"]]
                what = (f"column {absent[0]!r} is missing" if absent else f"column {extra[0]!r} is extra"
                        if extra else "its columns are in another order")
                refused[site] = f"site {site!r}: {what} (site {first_site!r} has {', '.join(first['features'])})"
                del joined[site]
    for site, why in refused.items():
        log(f"refused site {site}: {why}")
    return joined, refused


def _known_binary(config) -> bool:
    """Whether the study's labels are binary whatever the sites hold (the task or a positive
    label says so; a manifest without masks holds 0/1 labels), so no labels exchange is needed."""
    d = config.data
    masks = d.mask_column is not None or d.task == "segmentation"
    return d.task == "binary" or d.positive_label is not None or (config.deploy.site_files == "manifest" and not masks)


def labels_exchange(link: Link, config, study: Mapping[str, Any], names: list[str], refused: dict[str, str],
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Before setup: the task every site's file reads as and the class names each holds; the
    federation's task and classes (their union in the order the pooled data would get,
    :func:`medfed.data.tasks.merged_classes`), which every site codes its labels against at
    setup. A site that cannot read its labels is refused (added to ``refused``); sites whose
    labels read as different tasks stop the study, before any training."""
    answers = link.exchange({site: encode({"op": "labels", **study}) for site in names}, config.deploy.join_timeout_s)
    held: dict[str, Mapping[str, Any]] = {}
    for site in names:
        reply = _reply(answers, site, "labels")
        if isinstance(reply, str):
            refused[site] = reply
        else:
            held[site] = reply
    tasks = {site: str(r["task"]) for site, r in held.items()}
    if len(set(tasks.values())) > 1:
        read = ", ".join(f"{site}: {task} ({held[site]['task_source']})" for site, task in tasks.items())
        raise ConfigError(f"the sites' labels read as different tasks ({read}); say which in STUDY.toml's [data] "
                          "task = \"...\"")
    if not held:
        return {}
    task = next(iter(tasks.values()))
    classes = merged_classes(task, [tuple(r["classes"]) for r in held.values()])
    if config.data.task is None:  # inferred: printed and recorded (results.json's task_source)
        log(f"task: {task} ({next(iter(held.values()))['task_source']})")
    return {"task": task, "classes": list(classes)}


def _reply(answers: Mapping[str, bytes | str], site: str, step: str) -> Any:
    """A site's decoded answer to ``step``, or why there is none (no answer, a malformed one,
    the error the site reported), as a string."""
    raw = answers.get(site, "no answer")
    try:
        reply = raw if isinstance(raw, str) else decode(raw, f"the {step} answer of site {site!r}")
    except WireError as exc:
        return f"malformed answer: {exc}"
    return str(reply["error"]) if isinstance(reply, Mapping) and "error" in reply else reply


def _ask(link: Link, requests: Mapping[str, Any], timeout_s: float, expected: type, step: str) -> dict[str, Any]:
    """Every site's answer to its request of a harmonization step, each of type ``expected``;
    the fit needs every joined site, so a site that fails a step stops the study, by name."""
    answers = link.exchange({site: encode(r) for site, r in requests.items()}, timeout_s)
    out = {}
    for site in requests:
        reply = _reply(answers, site, step)
        if not isinstance(reply, expected) or getattr(reply, "site", site) != site:
            why = reply if isinstance(reply, str) else f"sent a {type(reply).__name__}, not its {expected.__name__}"
            raise DataError(f"site {site!r} failed the harmonization exchange ({step}): {why}")
        out[site] = reply
    return out


def harmonize_exchange(link: Link, config, joined: Mapping[str, dict]):
    """``[harmonize]`` over the setup channel: the coordinator fits from the statistics the
    sites shared at setup (and, for ComBat, their residual moments under the pooled fit, a
    second exchange) with the functions the simulation uses, and sends each site its share of
    the fit; each adjusts its own training and test rows and answers with their moments. The
    fit, and each site's moments of its adjusted training rows (what global scaling is
    assembled from, as in simulation)."""
    from medfed.data.frequency import AmplitudeStats, fit_frequency
    from medfed.data.harmonize import CombatDesignStats, CombatResidualStats, fit_combat, fit_location
    from medfed.experiments.harmonization import site_share

    spec, sites = config.harmonize, list(joined)
    if len(sites) < 2:
        raise ConfigError(f"[harmonize] method = \"{spec.method}\" removes differences between sites; "
                          f"only {len(sites)} site joined")
    timeout = config.deploy.join_timeout_s
    combat = spec.method == "combat"
    stats = [joined[s].get("harmonize") for s in sites]
    for site, got in zip(sites, stats):
        kind = CombatDesignStats if combat else AmplitudeStats
        if not isinstance(got, kind) or got.site != site:
            raise DataError(f"site {site!r} failed the harmonization exchange (setup): it sent no {kind.__name__}")
    if combat:
        location = fit_location(stats)
        residuals = _ask(link, {s: {"op": "harmonize", "step": "residuals", "location": location} for s in sites},
                         timeout, CombatResidualStats, "residuals")
        model = fit_combat(location, [residuals[s] for s in sites], joined[sites[0]]["features"], eb=spec.eb)
    else:
        model = fit_frequency(stats, spec.strength)
    applied = _ask(link, {s: {"op": "harmonize", "step": "apply", "model": site_share(model, s)} for s in sites},
                   timeout, Mapping, "apply")
    moments = {s: Moments(int(a["moments"]["n"]), np.asarray(a["moments"]["total"]), np.asarray(a["moments"]["total_sq"]))
               for s, a in applied.items()}
    return model, moments


def check_resume(out: Path, resume: bool) -> Path:
    """The folder of the study's checkpoints; refused when it holds an unfinished run that
    ``resume`` does not continue (a fresh start would silently throw its rounds away)."""
    checkpoints = Path(out) / CHECKPOINTS
    if checkpoints.exists() and not resume:
        raise ConfigError(f"{out} holds checkpoints of an unfinished run: continue it with --resume, or remove {checkpoints}")
    return checkpoints



def _site_targets(config, joined: Mapping[str, Any], sites) -> dict[str, Any]:
    """A multi-task study's ``site_targets`` (site -> its label column), as the pooled loader
    records them: each site reads its own ``label_column_site`` entry, the others ``label_column``."""
    own = config.data.label_column_site or {}
    if not own:
        return {}
    return {"site_targets": {site: own.get(site, config.data.label_column) for site in sites}}


def drive(link: Link, study_path: Path, out: Path, *, resume: bool = False, command: str | None = None,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the study in ``study_path`` over ``link``; write the report to ``out``; return results.json."""
    from medfed.experiments.report import report_files, write_atomically
    from medfed.experiments.results import results_document

    started = time.perf_counter()
    config = load_study(study_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = check_resume(out, resume)
    methods = resolve_methods(config.methods, config.method_options, config.pipelines)
    _status(out, state="setup", round="0/0", sites=list(config.deploy.sites))
    joined, refused = setup_exchange(link, config, log)
    for reply in joined.values():  # a distilling study needs the teacher at every site (deploy.site._teacher_problem)
        if reply.get("teacher_problem"):
            raise ConfigError(str(reply["teacher_problem"]))
    need = site_min_sites(config)
    if len(joined) < need:
        reasons = "; ".join(f"{s}: {why}" for s, why in refused.items())
        raise ConfigError(f"only {len(joined)} site(s) joined, fewer than min_sites = {need} ({reasons})")
    sites = list(joined)
    first = joined[sites[0]]
    shape = tuple(int(v) for v in first["sample_shape"])
    moments = [Moments(int(j["moments"]["n"]), np.asarray(j["moments"]["total"]), np.asarray(j["moments"]["total_sq"]))
               for j in joined.values()]
    harmonization = None
    if config.harmonize.method != "none":  # before the moments global scaling is assembled from, as in simulation
        harmonization, adjusted = harmonize_exchange(link, config, joined)
        moments = [adjusted[s] for s in sites]
    pooled = Standardizer.from_moments(moments) if config.scaling == "global" else Standardizer.identity(shape[0])
    scale = {"mean": pooled.mean, "scale": pooled.scale} if config.scaling == "global" else None
    task, classes = str(first.get("task", "binary")), tuple(first.get("classes", ()))
    # a regression target trains standardized by the pooled moments of every site's training targets
    target = (TargetScale.of([Moments(int(j["target_moments"]["n"]), np.asarray(j["target_moments"]["total"]),
                                      np.asarray(j["target_moments"]["total_sq"])) for j in joined.values()])
              if task == "regression" and config.data.standardize_target else UNSCALED)
    plan = TrainingPlan.for_shape(config, shape, task, n_outputs(task, classes))
    initial = plan.initial(shape, 0)
    counts = {site: np.asarray(j["train_label_counts"], dtype=np.float64) for site, j in joined.items()}
    t = config.training
    evaluations: list = []
    histories: list = []
    setting_time: dict[str, float] = {}
    models: dict[str, ModelOutcome] = {}
    privacy: list[dict] = []
    fed = DeployedFederation(
        "deployed", tuple(sites), tuple(joined[s]["summary"] for s in sites), tuple(first["features"]), shape,
        config.data.impute, first["positive_label"], bool(first["predefined_split"]),
        info={"label_column": config.data.label_column, "refused_sites": refused,
              "sites": {site: joined[site].get("data_info") for site in sites}, **_site_targets(config, joined, sites)},
        is_image=bool(first.get("is_image", False)), task=task, classes=classes,
        task_source=str(first.get("task_source", "given")),
    )
    check_task_study(config, fed, methods)  # what assumes two classes, refused before any method trains
    shared = [_SharedPreprocessing.of(site, joined[site]) for site in sites]
    sizes = {s: float(sum(c)) for s, c in counts.items()}
    if config.privacy.dp == "sample":  # what DP-SGD cannot make private, refused before any method trains
        for spec, opts in methods:
            plan.sample_private(spec, build_method(config, spec, _server_options(opts), sites, counts), sizes)
    base_run = {"sites": sites, "label_counts": {s: c for s, c in counts.items()}, "sample_shape": list(shape),
                "scale": scale, "task": task, "classes": list(classes),
                "target_scale": None if target is UNSCALED else {"mean": target.mean, "std": target.std},
                "seed": config.seed}

    def observer(display: str, rounds: int) -> Callable[[RoundRecord], None]:
        def observe(record: RoundRecord) -> None:
            _status(out, state="running", setting=display, round=f"{record.round + 1}/{rounds}", sites=sites,
                    missing=dict(record.missing), rejected=dict(record.rejected), skipped=record.skipped)
            gone = (f"; missing {', '.join(f'{s} ({why})' for s, why in record.missing.items())}"
                    if record.missing else "")
            log(f"{display}: round {record.round + 1}/{rounds} from {len(record.sites)} site(s){gone}")
        return observe

    for spec, opts in methods:
        t0 = time.perf_counter()
        key = (TRAIN_STREAM, 0, name_key(spec.name))
        rng = KeyedRng(config.seed, key)
        run_name = f"r1-{spec.name}"
        # a method with a pretraining phase (contrastive): phase 1 over the link, then its fine-tuning
        # method from phase 1's final model, as TrainingPlan.federated runs them in simulation
        trained, trained_opts, start, pretraining = spec, opts, initial, ()
        if spec.pretrain is not None:
            phase = spec.pretrain(opts, t, context_for(sites, config.seed, counts, model=config.model,
                                                         model_options=config.model_options))
            trained, trained_opts = phase.finetune, phase.finetune_options
            if phase.rounds > 0:
                phase_rng = rng.child(name_key("contrastive/pretrain"))
                _, server = programs(phase.algorithm, plan.local, sites, fraction=t.fraction_fit, min_sites=need,
                                     codec=make_codec(config.compress))
                executor = RemoteExecutor(link, sites, {**base_run, "name": f"{run_name}-pretrain", "method": spec.name,
                                                        "options": dict(opts), "phase": "pretrain",
                                                        "key": list(phase_rng.key)}, config.deploy.round_timeout_s)
                store = CheckpointStore(checkpoints / f"{run_name}-pretrain",
                                        f"{study_fingerprint(config)}/{run_name}-pretrain/{','.join(sites)}")
                ran = Driver(server, executor, phase.rounds, phase_rng, checkpoints=store,
                             observe=observer(f"{spec.display} (pretraining)", phase.rounds)).run(initial)
                start, pretraining = ran.params, tuple(ran.history)
        rounds = trained.rounds(t)
        algorithm = build_method(config, trained, _server_options(trained_opts), sites, counts)
        # the server's end of DP (the noised fixed-denominator mean) and of secure aggregation
        algorithm, secure = plan.private(trained, algorithm, sizes, rng.child(name_key("dp-noise")), min_sites=need)
        local = plan.sample_private(trained, algorithm, sizes)
        privacy += plan.ledger(spec, sites, 0, sizes)
        _, server = programs(algorithm, local, sites, fraction=t.fraction_fit, min_sites=need,
                             max_update_norm=t.max_update_norm, codec=make_codec(config.compress),
                             poisson=config.privacy.dp != "none", secure=secure)
        run = {**base_run, "name": run_name, "method": trained.name, "options": dict(trained_opts), "key": list(key)}
        executor = RemoteExecutor(link, sites, run, config.deploy.round_timeout_s)
        store = CheckpointStore(checkpoints / run_name, f"{study_fingerprint(config)}/{run_name}/{','.join(sites)}")
        result = Driver(server, executor, rounds, rng, checkpoints=store,
                        observe=observer(spec.display, rounds)).run(start)
        if pretraining:  # its rounds' uploads left the sites too: the history counts them (federated_history)
            result = dataclasses.replace(result, pretraining=pretraining)
        failure = federated_failure(result)
        final = server.configure(ServerState(result.params, result.server_state, rounds),
                                 RoundContext(rounds, tuple(sites), rng), final=True)
        answers = executor.evaluate(final, global_model=spec.global_model and failure is None,
                                    personal=spec.personal or not spec.global_model)
        scored = _evaluations(spec, sites, answers, failure, config.evaluation.threshold)
        evaluations += scored
        histories.append(federated_history(spec, 0, result, config))
        if failure is None and spec.global_model and harmonization is None:
            models[spec.display] = ModelOutcome(spec.display, saved_model_file(
                config, fed, shared, pooled, result.params, setting=spec.display, method=spec.name,
                train_sites=sites, settings=[spec.display], personal=spec.personal,
                thresholds={e.key[3]: e.threshold for e in scored if e.key[5] == "global" and e.threshold}
                if task == "binary" else None, target=target))
        else:
            if failure is not None:
                why = failure.reason
            elif harmonization is not None:
                why = f"not saved: a saved model does not carry the [harmonize] {config.harmonize.method} fit yet"
            else:
                why = (f"no global model: {spec.display} shares only part of the model; each site's personal model "
                       "stays at the site")
            models[spec.display] = ModelOutcome(spec.display, None, why)
        setting_time[spec.display] = time.perf_counter() - t0
    outcome = RepeatOutcome(evaluations, histories, [], setting_time, models=models, privacy=privacy,
                            # what each site counted of its training rows without a target (none hidden deployed)
                            unlabeled={s: (int(joined[s]["unlabeled_rows"]), 0) for s in sites
                                       if joined[s]["unlabeled_rows"]},
                            harmonization=None if harmonization is None else deployed_report(harmonization),
                            target_scales=[] if target is UNSCALED else [
                                {"train_sites": sites, "n": sum(int(joined[s]["target_moments"]["n"]) for s in sites),
                                 "mean": target.mean, "std": target.std}])
    # the deployed run always keeps its final global models (models/<Setting>.npz)
    experiment = assemble_run(config.model_copy(update={"save_model": True}), fed, methods, [outcome], started)
    experiment.warnings.extend(f"site {s!r} was refused: {why}" for s, why in refused.items())
    doc = results_document(experiment, command)
    files = report_files(doc, experiment, plots=False)
    write_atomically(out, files)
    _status(out, state="finished", round=f"{rounds}/{rounds}" if methods else "0/0", sites=sites)
    import shutil

    shutil.rmtree(checkpoints, ignore_errors=True)
    return doc


def _server_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """The options the coordinator builds a method's server end with: a distilling method's
    ``teacher`` left out (a site's own file, which the coordinator never reads; the site resolves
    the path the run's options carry on its machine)."""
    return {**opts, "teacher": ""} if opts.get("teacher") else dict(opts)


def _evaluations(spec, sites: list[str], answers: Mapping[str, Any], failure: Failure | None, rule: str) -> list:
    """The sites' metric reports as the harness's evaluations, with the decision threshold each
    chose by ``rule`` on its own training rows (a failure or a missing report makes a row not
    computable, with the reason)."""
    out = []
    kinds = (["global"] if spec.global_model else []) + (["personal"] if spec.personal or not spec.global_model else [])
    for site in sites:
        answer = answers.get(site)
        for kind in kinds:
            key = (spec.display, spec.name, None, site, "split", kind)
            if kind == "global" and failure is not None:
                out.append(Evaluation(key, failure))
                continue
            got = answer.get(kind) if isinstance(answer, Mapping) else None
            if isinstance(got, Mapping):
                metrics = {m: Metric(v[0], v[1]) for m, v in got["metrics"].items()}
                if got["threshold"] is None:  # a task without a decision threshold
                    out.append(Evaluation(key, metrics))
                    continue
                logit, reason = got["threshold"]
                out.append(Evaluation(key, metrics, None, Threshold(rule, logit, reason), "site"))
            else:
                why = got if isinstance(got, str) else f"site {site!r} sent no evaluation ({answer})"
                kind_of = "diverged" if isinstance(got, str) and got.startswith("diverged") else "not computable"
                out.append(Evaluation(key, Failure(kind_of, why)))
    return out
