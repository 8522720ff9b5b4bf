"""Robustness audit (survey §3.3.3, §7.1.2): what F corrupted sites do to each defense.

For every repeat the sites are split as in the experiment harness, and F sites are chosen as
corrupted (keyed by seed, repeat and site name, so the choice does not depend on the order of
the sites; the same sites for every defense in a repeat). Each defense then trains twice on
the same splits and with the same random draws: once with every site honest (``clean``) and
once with the F sites running the attack (``attacked``, see :mod:`medfed.client.adversary`).
Both final global models are evaluated on the test rows of the sites that are clean in that
repeat, pooled into one test set (one model, one threshold, and enough rows for a stable AUC
when sites are small); per-site values are kept in each repeat's record. The ``drop`` is the
paired per-repeat difference by which the attack made a metric worse, positive when it hurt:
``clean - attacked``, and ``attacked - clean`` for the errors that fall as a model gets better
(MAE, RMSE, HD95: :func:`medfed.experiments.metrics.lower_is_better`).

Tasks: every task. Data attacks follow the task
(:func:`medfed.client.adversary.flip_labels`: a class permutation, every bit of a multilabel
row, a mask's classes shifted, a regression target reflected about its site's mean); each
defense is scored with the task's own metrics (:mod:`medfed.experiments.metrics`): binary at a
decision threshold chosen on each clean site's training rows, multiclass at the most probable
class, multilabel per label at 0.5, segmentation per test image (pooled: the mean over the
clean sites' images), regression on the target's own scale (trained standardized by the
pooled moments of every site's honest training targets, as ``medfed run`` does; a reflection
about a site's mean keeps that site's moments, so a corrupted site would share the same). Keys of ``robustness.json`` that say which:
``task``, ``task_source``, ``classes``; ``metrics`` (every key a defense's ``clean``, ``attacked``
and ``drop`` and each repeat's ``pooled``/``sites`` values hold: the task's set, then per class
or label, e.g. ``sen:<class>``, ``auc:<label>``); ``headline`` (the task's set, the Markdown's
columns); ``screen`` (the two the terminal shows: ACC and AUC for binary, ACC and macro-AUC for
multiclass, macro-AUC and subset ACC for multilabel). Binary documents hold what they always did.

A defense whose assumptions fail (e.g. Krum with too few sites for F) is noted in the output
(:func:`medfed.server.robust.assumption_violations`); a run in which its aggregator refuses a
round (:class:`~medfed.errors.ConfigError`) is recorded as not computable with the reason,
and the audit goes on with the other defenses.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medfed.client.adversary import (
    ATTACK_SUMMARIES,
    DATA_ATTACKS,
    DEFAULT_SCALE,
    check_attack,
    check_attack_task,
    corrupt_data,
    corrupt_rule,
)
from medfed.data.federation import Federation
from medfed.data.tasks import TargetScale
from medfed.errors import ConfigError
from medfed.experiments.config import ExperimentConfig
from medfed.experiments.harness import (
    TRAIN_STREAM,
    ScaledViews,
    TrainingPlan,
    check_study,
    federated_failure,
    load_federation,
    prepare_repeat,
    repeat_harmonizer,
)
from medfed.experiments.metrics import (
    BINARY,
    Metric,
    metric_keys,
    metric_label,
    metric_set,
    lower_is_better,
    model_threshold,
    predicted_metrics,
    task_metrics,
    task_scores,
)
from medfed.experiments.report import write_atomically
from medfed.experiments.results import (
    STD_DDOF,
    format_metric,
    package_versions,
    summarize,
)
from medfed.methods import METHODS, Method, resolve_methods
from medfed.rng import KeyedRng, name_key
from medfed.server.robust import ROBUST_AGGREGATORS, assumption_violations

CONDITIONS = ("clean", "attacked")
CHOICE_STREAM = name_key("audit-corrupted-sites")
LABEL_STREAM = name_key("audit-poisoned-labels")
EVALUATION = "pooled test rows of the sites that are clean in the repeat"
# the two headline metrics per task the terminal table shows; the files carry every metric
SCREEN_METRICS = {"binary": ("acc", "auc"), "multiclass": ("acc", "macro_auc"), "multilabel": ("macro_auc", "subset_acc"),
                  "regression": ("mae", "r2"), "segmentation": ("dice", "hd95")}


@dataclasses.dataclass(frozen=True)
class Attack:
    """What the corrupted sites do: ``kind`` (an attack name), at ``corrupt`` sites.

    ``scale`` is the multiplier of ``sign_flip`` (default 1) and ``scale`` (default 10),
    ``sigma`` the noise std of ``gaussian``, ``rate`` the redraw probability of ``noisy_labels``.
    """

    kind: str
    corrupt: int = 1
    scale: float | None = None
    sigma: float = 1.0
    rate: float = 0.3

    def __post_init__(self) -> None:
        check_attack(self.kind, scale=self.scale, sigma=self.sigma, rate=self.rate)
        if isinstance(self.corrupt, bool) or not isinstance(self.corrupt, (int, np.integer)) or self.corrupt < 1:
            raise ConfigError(
                f"corrupt must be a whole number of sites >= 1, got {self.corrupt!r} "
                "(with no corrupted site the attacked run is the clean one)"
            )

    @property
    def parameters(self) -> dict[str, float]:
        """The parameters this attack uses, with defaults filled in."""
        if self.kind in DEFAULT_SCALE:
            return {"scale": DEFAULT_SCALE[self.kind] if self.scale is None else float(self.scale)}
        if self.kind == "gaussian":
            return {"sigma": float(self.sigma)}
        if self.kind == "noisy_labels":
            return {"rate": float(self.rate)}
        return {}


DEFAULT_DEFENSES = ("fedavg", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "dos")


def default_defenses() -> list[str]:
    """The defenses an audit compares when none are named: FedAvg and the robust rules that exist."""
    return [name for name in DEFAULT_DEFENSES if name in METHODS]


def choose_corrupted(site_names: list[str], corrupt: int, seed: int, repeat: int) -> list[str]:
    """The ``corrupt`` sites that attack in ``repeat``: the smallest of one keyed uniform draw per
    site name, so the choice depends on the names, not on their order. Returned in site order."""
    draws = {s: KeyedRng(seed, (CHOICE_STREAM, repeat, name_key(s))).generator.random() for s in site_names}
    chosen = set(sorted(site_names, key=lambda s: (draws[s], s))[:corrupt])
    return [s for s in site_names if s in chosen]


def trim_fraction(corrupt: int, n_sites: int) -> float:
    """A trimmed-mean ``beta`` that cuts exactly ``corrupt`` updates per side of ``n_sites``
    (``int(beta * K) == F``) and stays below 1/2: ``(F + d) / K`` with ``d`` midway between F/K
    and the next cut, or midway to 1/2 when that is closer (3 sites, F = 1: beta = 0.417)."""
    d = min(0.5, (n_sites / 2 - corrupt) / 2)  # > 0 because 2F < K
    return (corrupt + d) / n_sites


def _defense_options(methods, method_options: Mapping[str, Mapping[str, Any]], corrupt: int, n_sites: int):
    """Every defense must be federated. Options the user did not set are sized for F: ``f``
    becomes F, and trimmed_mean's ``beta`` cuts F updates at each end (when F < K/2)."""
    out = []
    for spec, opts in methods:
        if spec.kind != "federated":
            raise ConfigError(
                f"defenses: {spec.name!r} is a centralized setting, not a federated defense; "
                "give federated methods (see `medfed methods`)"
            )
        opts = dict(opts)
        user = method_options.get(spec.name, {})
        if "f" in spec.defaults and "f" not in user:
            opts["f"] = corrupt
        if spec.name == "trimmed_mean" and "beta" not in user and 2 * corrupt < n_sites:
            opts["beta"] = trim_fraction(corrupt, n_sites)
        out.append((spec, opts))
    return out


def _assumption_notes(spec: Method, opts: dict, n_sites: int, corrupt: int) -> list[str]:
    """What :func:`medfed.server.robust.assumption_violations` says about this defense and F."""
    notes = []
    if "f" in opts and opts["f"] != corrupt:
        notes.append(f"{spec.name} is set to tolerate f={opts['f']}, but {corrupt} site(s) are corrupted")
    if spec.name not in ROBUST_AGGREGATORS:
        return notes
    options = {"f": corrupt, **{k: v for k, v in opts.items() if not isinstance(v, dict)}}
    try:
        for text in assumption_violations(spec.name, n_sites, **options):
            notes.append(text if text.startswith(spec.name) else f"{spec.name}: {text}")
    except ConfigError as exc:
        notes.append(f"{spec.name}: assumptions not checked ({exc})")
    return notes


def _metric_values(metrics: dict[str, Metric], keys: tuple[str, ...]) -> dict[str, float | None]:
    return {m: metrics[m].value for m in keys}


def _evaluate(model, params, y_tests, tests, train, clean: list[int], names: list[str], rule: str):
    """Pooled metrics over the clean sites' test rows, and each clean site's own, each site's
    rows predicted at the threshold ``rule`` chose on its own (clean) training rows ``train[j]``
    (as in the experiment); the pooled metrics count those predictions together. Also each
    clean site's threshold (logit), ``None`` where undefined."""
    probabilities = {j: model.predict_proba(params, tests[j]) for j in clean}
    logits = {j: model.decision(params, tests[j]) for j in clean}  # AUC ranks by logit (no saturated ties)
    thresholds = {j: model_threshold(rule, model, params, train[j].X, train[j].y) for j in clean}
    undefined = next((t.reason for t in thresholds.values() if t.logit is None), None)
    predicted = {j: thresholds[j].predict(probabilities[j], logits[j]) if thresholds[j].logit is not None
                 else np.zeros(len(y_tests[j]), dtype=bool) for j in clean}

    def scored(js: list[int], reason: str | None) -> dict[str, Metric]:
        out = predicted_metrics(np.concatenate([y_tests[j] for j in js]), np.concatenate([predicted[j] for j in js]),
                                np.concatenate([logits[j] for j in js]))
        return {m: Metric(None, reason) if reason and m != "auc" else v for m, v in out.items()}

    pooled = scored(clean, undefined)
    per_site = {names[j]: scored([j], thresholds[j].reason) for j in clean}
    return pooled, per_site, {names[j]: thresholds[j].logit for j in clean}


def _evaluate_task(task: str, classes: tuple[str, ...], model, params, y_tests, tests, clean: list[int],
                   names: list[str], target: TargetScale):
    """:func:`_evaluate` for the other tasks: their metrics (:func:`task_metrics`; a row predicted
    its most probable class, a label at probability 0.5, a regression value mapped back by
    ``target``) pooled over the clean sites' test rows and per clean site; there is no threshold
    to choose (``None`` per site)."""
    scores = {j: task_scores(model, params, tests[j]) for j in clean}
    if task == "regression":
        scores = {j: None if v is None else target.inverse(v) for j, v in scores.items()}
    if any(v is None for v in scores.values()):  # a diverged model: no number to report
        missing = {m: Metric(None, "the model's predictions are not finite") for m in metric_keys(task, classes)}
        return dict(missing), {names[j]: dict(missing) for j in clean}, {names[j]: None for j in clean}
    pooled = task_metrics(task, np.concatenate([y_tests[j] for j in clean]),
                          np.concatenate([scores[j] for j in clean]), classes)
    per_site = {names[j]: task_metrics(task, y_tests[j], scores[j], classes) for j in clean}
    return pooled, per_site, {names[j]: None for j in clean}


def _audit_repeat(config, attack: Attack, federation, methods, repeat: int, progress) -> tuple[list[str], list[dict]]:
    """One repeat: split, choose the corrupted sites, train every defense clean and attacked.

    Training goes through the harness's :class:`~medfed.experiments.harness.TrainingPlan`, the
    one path every experiment uses (local epochs, label counts at setup, screening).
    """
    plan = TrainingPlan.of(config, federation)
    names = list(federation.site_names)
    sites = prepare_repeat(federation, config, repeat)
    # [harmonize] as medfed run applies it: the federation's fit, every site adjusted
    everyone = tuple(range(len(sites)))
    views = ScaledViews(sites, config.scaling, repeat_harmonizer(config, federation, sites),
                        standardize_target=federation.task == "regression" and config.data.standardize_target)
    train, tests = views(everyone)
    corrupted = choose_corrupted(names, attack.corrupt, config.seed, repeat)
    clean = [j for j, s in enumerate(names) if s not in corrupted]
    poisoned = list(train)
    if attack.kind in DATA_ATTACKS:
        for j, s in enumerate(names):
            if s in corrupted:
                rng = KeyedRng(config.seed, (LABEL_STREAM, repeat, name_key(s)))
                poisoned[j] = corrupt_data(train[j], attack.kind, rng, rate=attack.rate, task=federation.task,
                                           n_classes=federation.n_classes or 2)

    def corrupt(algorithm):
        rule = corrupt_rule(algorithm.local_update, attack.kind, scale=attack.scale, sigma=attack.sigma, sites=corrupted)
        return dataclasses.replace(algorithm, local_update=rule)

    y_tests = [s.y_test for s in sites]
    initial = plan.initial(federation, repeat)
    records = []
    for spec, opts in methods:
        record: dict[str, Any] = {"repeat": repeat}
        for condition in CONDITIONS:
            if progress:
                progress(f"repeat {repeat + 1}/{config.repeats}: {spec.display} ({condition})")
            attacked = condition == "attacked"
            data = poisoned if attacked and attack.kind in DATA_ATTACKS else train
            adapt = corrupt if attacked and attack.kind not in DATA_ATTACKS else None
            try:
                # clean and attacked draw the same numbers: the attack is the only difference
                run = plan.federated(
                    spec, opts, data, initial, KeyedRng(config.seed, (TRAIN_STREAM, repeat, name_key(spec.name))),
                    adapt=adapt,
                )
            except ConfigError as exc:  # the defense refused a round: its assumption does not hold
                record[condition] = {"computable": False, "reason": str(exc), "diverged": False}
                continue
            failure = federated_failure(run)
            if failure is not None:
                record[condition] = {"computable": False, "reason": failure.reason,
                                     "diverged": failure.kind == "diverged"}
                continue
            if federation.task == "binary":
                pooled, per_site, thresholds = _evaluate(plan.model, run.params, y_tests, tests, train, clean, names,
                                                         config.evaluation.threshold)
            else:
                pooled, per_site, thresholds = _evaluate_task(federation.task, federation.classes, plan.model,
                                                              run.params, y_tests, tests, clean, names,
                                                              views.target_scale(everyone))
            record[condition] = {
                "computable": True,
                "reason": None,
                "pooled": pooled,
                "sites": per_site,
                "thresholds": thresholds,
                "rejected_uploads": sum(len(r.rejected) for r in run.history),
                "skipped_rounds": sum(r.skipped is not None for r in run.history),
                "example_rejection": next((f"round {r.round}: {s}: {why}" for r in run.history
                                           for s, why in r.rejected.items()), None),
            }
        records.append(record)
    return corrupted, records


def _condition_metrics(records: list[dict], condition: str, keys: tuple[str, ...]) -> dict[str, list[Metric]]:
    out: dict[str, list[Metric]] = {m: [] for m in keys}
    for rec in records:
        c = rec[condition]
        for m in keys:
            out[m].append(c["pooled"][m] if c["computable"] else Metric(None, f"not computable: {c['reason']}"))
    return out


def _drop(clean: list[Metric], attacked: list[Metric], key: str) -> list[Metric]:
    """Per repeat, how much worse the attack made metric ``key`` (positive: it hurt)."""
    sign = -1.0 if lower_is_better(key) else 1.0
    out = []
    for a, b in zip(clean, attacked):
        if a.value is None or b.value is None:
            out.append(Metric(None, a.reason or b.reason))
        else:
            out.append(Metric(sign * (a.value - b.value)))
    return out


def _defense_row(spec: Method, opts: dict, records: list[dict], notes: list[str], keys: tuple[str, ...]) -> dict[str, Any]:
    metrics = {c: _condition_metrics(records, c, keys) for c in CONDITIONS}
    notes = list(notes)
    failures = {}  # (repeats, reasons) -> conditions, so a defense that never runs gets one note
    for condition in CONDITIONS:
        failed = [r for r in records if not r[condition]["computable"]]
        if failed:
            key = (", ".join(str(r["repeat"] + 1) for r in failed),
                   "; ".join(sorted({r[condition]["reason"] for r in failed})))
            failures.setdefault(key, []).append(condition)
    for (which, reasons), conditions in failures.items():
        notes.append(f"{spec.display} ({' and '.join(conditions)}): no result in repeat(s) {which}: {reasons}")
    for condition in CONDITIONS:
        done = [r[condition] for r in records if r[condition]["computable"]]
        rejected = sum(c["rejected_uploads"] for c in done)
        if rejected:
            example = next(c["example_rejection"] for c in done if c["example_rejection"])
            notes.append(f"{spec.display} ({condition}): the server rejected {rejected} upload(s), e.g. {example}")
        skipped = sum(c["skipped_rounds"] for c in done)
        if skipped:
            notes.append(f"{spec.display} ({condition}): {skipped} round(s) left the global model unchanged")

    def repeat_view(r: dict) -> dict[str, Any]:
        view: dict[str, Any] = {"repeat": r["repeat"]}
        for c in CONDITIONS:
            cond = r[c]
            if cond["computable"]:
                view[c] = {
                    "computable": True,
                    "pooled": _metric_values(cond["pooled"], keys),
                    "sites": {s: _metric_values(v, keys) for s, v in cond["sites"].items()},
                    "threshold_logit": cond["thresholds"],  # each clean site's, on its own training rows
                    "rejected_uploads": cond["rejected_uploads"],
                    "skipped_rounds": cond["skipped_rounds"],
                }
            else:
                view[c] = {"computable": False, "reason": cond["reason"], "diverged": cond.get("diverged", False)}
        return view

    return {
        "name": spec.name,
        "display": spec.display,
        "reference": spec.reference,
        "uploads": spec.uploads or None,
        "options": opts,
        "computable": {c: any(r[c]["computable"] for r in records) for c in CONDITIONS},
        # conditions whose model diverged in every repeat (shown as "diverged", not as a number)
        "diverged": {c: all(r[c].get("diverged", False) for r in records) for c in CONDITIONS},
        "clean": {m: summarize(metrics["clean"][m]) for m in keys},
        "attacked": {m: summarize(metrics["attacked"][m]) for m in keys},
        "drop": {m: summarize(_drop(metrics["clean"][m], metrics["attacked"][m], m)) for m in keys},
        "notes": notes,
        "per_repeat": [repeat_view(r) for r in records],
    }


def run_robustness_audit(
    config: ExperimentConfig,
    attack: Attack,
    *,
    federation: Federation | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the audit and return its results document (JSON-serializable).

    ``config`` gives the data, the defenses (``config.methods``, federated method names, with
    ``config.method_options``), the shared training settings, the repeats, the seed, the split
    and the scaling; ``loso``, ``eval_every``, ``plots`` and ``workers`` are not used. A
    defense's ``f`` option (krum, multikrum, bulyan) is set to ``attack.corrupt`` unless
    ``config.method_options`` sets it. ``federation`` skips loading ``config.data`` again.
    """
    started = time.perf_counter()
    federation = federation if federation is not None else load_federation(config.data)
    names = list(federation.site_names)
    if attack.corrupt >= len(names):
        raise ConfigError(
            f"corrupt must be smaller than the number of sites ({len(names)} in {federation.name!r}), "
            f"got {attack.corrupt}: clean sites are needed to evaluate on"
        )
    methods = _defense_options(
        resolve_methods(config.methods, config.method_options, config.pipelines), config.method_options,
        attack.corrupt, len(names),
    )
    # bad hyperparameters fail here, before any training; a defense whose site-count assumption
    # fails is not refused but noted and recorded as not computable (that is what the audit shows)
    check_attack_task(attack.kind, federation.task)
    check_study(config, federation, methods, site_requirements=False)
    assumptions = [_assumption_notes(spec, opts, len(names), attack.corrupt) for spec, opts in methods]

    corrupted_sites = []
    records: list[list[dict]] = [[] for _ in methods]
    for repeat in range(config.repeats):
        corrupted, per_defense = _audit_repeat(config, attack, federation, methods, repeat, progress)
        corrupted_sites.append(corrupted)
        for i, rec in enumerate(per_defense):
            records[i].append(rec)

    summary, reference = ATTACK_SUMMARIES[attack.kind]
    keys = metric_keys(federation.task, federation.classes)
    return {
        "audit": "robustness",
        "dataset": federation.name,
        "description": federation.description,
        "attribution": federation.attribution,
        "attack": {"kind": attack.kind, "summary": summary, "reference": reference, **attack.parameters},
        "corrupt": attack.corrupt,
        "corrupted_sites": corrupted_sites,
        "sites": [{"name": s.name, "n": s.n} for s in federation.sites],
        "evaluation": EVALUATION,
        "seed": config.seed,
        "repeats": config.repeats,
        "split": "predefined" if federation.has_predefined_split
        else f"stratified {1 - config.test_fraction:.0%}/{config.test_fraction:.0%} per site",
        "scaling": config.scaling,
        "threshold": config.evaluation.threshold,  # chosen on each clean site's own training rows
        "task": federation.task,
        "task_source": federation.task_source,
        "classes": list(federation.classes),
        "metrics": list(keys),  # every metric of the defenses' clean/attacked/drop, in order
        "headline": list(metric_set(federation.task).keys),  # the task's set: the Markdown's columns
        "screen": list(SCREEN_METRICS[federation.task]),  # the terminal table's
        "std_ddof": STD_DDOF,
        "config": config.model_dump(mode="json"),
        "versions": package_versions(),
        "runtime_s": time.perf_counter() - started,
        "defenses": [
            _defense_row(spec, opts, recs, notes, keys)
            for (spec, opts), recs, notes in zip(methods, records, assumptions)
        ],
    }


# --------------------------------------------------------------------------- reports


def audit_rows(doc: dict[str, Any], metrics: tuple[str, ...] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Table rows (defense, clean/attacked/drop cells per metric, note numbers) and the numbered notes;
    ``metrics`` default to the task's set (:func:`headline`).

    The screen table, the Markdown and the CSV all come from the document, so they agree.
    """
    metrics = headline(doc) if metrics is None else metrics
    rows, notes = [], []
    for d in doc["defenses"]:
        numbers = []
        for note in d["notes"]:
            notes.append(note)
            numbers.append(len(notes))
        cells = {c: [format_metric(d[c][m]) for m in metrics] for c in ("clean", "attacked", "drop")}
        for c in CONDITIONS:
            if not d["computable"][c]:
                cells[c] = ["diverged" if d.get("diverged", {}).get(c) else "not computable"] * len(metrics)
        rows.append({"defense": d["display"], "cells": cells, "notes": numbers})
    return rows, notes


def headline(doc: dict[str, Any]) -> tuple[str, ...]:
    """The task's metric set a document's Markdown shows (documents before tasks: binary)."""
    return tuple(doc.get("headline", BINARY.keys))


def all_metrics(doc: dict[str, Any]) -> tuple[str, ...]:
    """Every metric a document's defenses carry, in order (documents before tasks: binary)."""
    return tuple(doc.get("metrics", BINARY.keys))


def _label(row: dict[str, Any]) -> str:
    return row["defense"] + (f" [{', '.join(map(str, row['notes']))}]" if row["notes"] else "")


def _heading(doc: dict[str, Any]) -> list[str]:
    attack = doc["attack"]
    params = ", ".join(f"{k}={attack[k]:g}" for k in ("scale", "sigma", "rate") if k in attack)
    described = (
        f"Attack `{attack['kind']}`{f' ({params})' if params else ''}: each corrupted site {attack['summary']} "
        f"({attack['reference']})."
    )
    chosen = "; ".join(f"{i + 1}: {', '.join(s)}" for i, s in enumerate(doc["corrupted_sites"]))
    protocol = (
        f"Evaluated on the {doc['evaluation']}. Split: {doc['split']}, {doc['repeats']} repeat(s), "
        f"seed {doc['seed']}; scaling: {doc['scaling']}. Mean ± sample std over repeats; "
        "drop = clean − attacked (attacked − clean for errors: MAE, RMSE, HD95), paired by repeat; "
        "positive: the attack hurt."
    )
    return [described, f"{doc['corrupt']} of {len(doc['sites'])} sites corrupted; per repeat: {chosen}.", protocol]


def robustness_markdown(doc: dict[str, Any]) -> str:
    rows, notes = audit_rows(doc)
    lines = [f"# Robustness audit: {doc['dataset']}", "", *_heading(doc), ""]
    lines += ["| Defense | Condition | " + " | ".join(metric_label(m) for m in headline(doc)) + " |",
              "|---|---|" + "---|" * len(headline(doc))]
    for row in rows:
        for c in ("clean", "attacked", "drop"):
            lines.append(f"| {_label(row) if c == 'clean' else ''} | {c} | " + " | ".join(row["cells"][c]) + " |")
    if notes:
        lines += ["", *[f"[{i}] {text}" for i, text in enumerate(notes, 1)]]
    if doc.get("attribution"):
        lines += ["", f"Data: {doc['attribution']}"]
    return "\n".join(lines) + "\n"


def robustness_csv(doc: dict[str, Any]) -> str:
    """One line per defense and condition (clean, attacked, drop), metrics as mean, std, n."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["defense", "method", "condition", "computable", "notes"]
    for m in all_metrics(doc):
        header += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    writer.writerow(header)
    for d in doc["defenses"]:
        for condition in ("clean", "attacked", "drop"):
            computable = all(d["computable"].values()) if condition == "drop" else d["computable"][condition]
            line = [d["display"], d["name"], condition, computable, "; ".join(d["notes"])]
            for m in all_metrics(doc):
                s = d[condition][m]
                line += ["" if s["mean"] is None else repr(s["mean"]),
                         "" if s["std"] is None else repr(s["std"]), s["n"]]
            writer.writerow(line)
    return buf.getvalue()


def write_robustness_report(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``robustness.json``, ``.csv`` and ``.md`` to ``out_dir``, all or nothing."""
    return write_atomically(out_dir, audit_files(doc))


def audit_files(doc: dict[str, Any]) -> dict[str, Callable[[], bytes]]:
    """The audit's files as producers of their bytes, for :func:`~medfed.experiments.report.write_atomically`."""
    return {
        "robustness.json": lambda: (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode(),
        "robustness.csv": lambda: robustness_csv(doc).encode(),
        "robustness.md": lambda: robustness_markdown(doc).encode(),
    }
