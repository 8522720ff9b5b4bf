"""Privacy audits (survey §2.1, §7.1.2): attack the federation's own models, and price its DP.

Both audits train every requested federated method at every noise multiplier z of a list on
the same repeated per-site splits, with the same keyed random draws (so z = 0, the plain run
without DP, reproduces ``medfed run``'s numbers for that method), and score each model:

- ``membership``: a loss-threshold membership-inference attack (Yeom et al., 2018). The
  attacker calls a row a member when the model's loss on it is low; per site, the attack AUC
  is the ROC AUC of ``-loss`` separating the site's training rows (members) from its held-out
  test rows (non-members). 0.5 is chance, 1 a model that gives away who trained it. The final
  global model is attacked and, for personalizing methods (ditto, apfl, finetune), each
  site's personal model on that site's rows.
- ``privacy``: utility (ACC, AUC on each site's test rows) against the epsilon each site
  spent (client-level DP, McMahan et al., 2018; epsilon from the run's ledger,
  :meth:`~medfed.experiments.harness.TrainingPlan.ledger`), with a plot of AUC against
  epsilon per method.

Tasks: every task. A row's loss is the model's own training loss on that row (binary: the
log-loss at its probability; the other tasks: :func:`example_losses`, the data term the model
trains on: cross-entropy over K classes, the labels' summed log-losses, half the squared error
on the standardized target scale the model trained on, Dice + cross-entropy per image). The
utility columns are the task's metric set (:mod:`medfed.experiments.metrics`; binary ACC and
AUC), a regression model's predictions mapped back to the target's own scale first.

``noise = 0`` means no DP at all (not DP with zero noise, which would still clip): epsilon is
infinite there (``None`` in the JSON). Values are the mean ± sample std over the repeats.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.errors import ConfigError
from medfed.experiments.config import ExperimentConfig, PrivacySpec
from medfed.experiments.harness import (
    LOSS_RISE_WARNING,
    TRAIN_STREAM,
    ScaledViews,
    TrainingPlan,
    check_study,
    federated_failure,
    load_federation,
    loss_rise,
    prepare_repeat,
    repeat_harmonizer,
)
from medfed.data.tasks import TargetScale
from medfed.experiments.metrics import (
    Metric,
    binary_metrics,
    metric_label,
    metric_set,
    roc_auc,
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
from medfed.methods import Method, resolve_methods
from medfed.rng import KeyedRng, name_key

AUDITS = ("membership", "privacy")
# a probability is kept this far from 0 and 1 so a confident wrong row has a finite loss
PROBABILITY_FLOOR = 1e-12


def row_losses(probabilities: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's binary cross-entropy at the model's positive-class probability."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    y = np.asarray(y, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def example_losses(model, params, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's own data term, the loss the model trains on without the L2 penalty (targets as
    the model trained on them: a regression target on its standardized scale). A torch model's
    from its head in one forward pass (``Head.torch_loss``, ``reduction="none"``); a numpy model
    reports only the mean of its data term, and the mean over one row is that row's term."""
    head = getattr(model, "head", None)
    if head is not None:
        import torch  # a torch model's audit has torch loaded already

        z = torch.from_numpy(np.ascontiguousarray(model.decision(params, X)))
        return head.torch_loss(z, torch.from_numpy(head.targets(y)), "none").numpy()
    return np.array([model.loss(params, X[i : i + 1], y[i : i + 1]) for i in range(X.shape[0])], dtype=np.float64)


def utility_keys(task: str) -> tuple[str, ...]:
    """The test metrics an audit row keeps: binary ACC and AUC (as always), else the task's set."""
    return ("acc", "auc") if task == "binary" else metric_set(task).keys


def membership_auc(member_losses: np.ndarray, non_member_losses: np.ndarray) -> float | None:
    """The loss-threshold attack's AUC: how well ``-loss`` ranks members above non-members
    (ties count one half); ``None`` when either group is empty."""
    members, others = np.asarray(member_losses), np.asarray(non_member_losses)
    if members.size == 0 or others.size == 0:
        return None
    is_member = np.concatenate([np.ones(members.size, bool), np.zeros(others.size, bool)])
    return roc_auc(is_member, -np.concatenate([members, others]))


def parse_noises(values: Sequence[float]) -> list[float]:
    """The noise multipliers of an audit: one or more, each >= 0, no repeats, in the order given."""
    noises = [float(z) for z in values]
    if not noises:
        raise ConfigError("--noise takes one or more noise multipliers, e.g. --noise 0,1 (0: no DP)")
    bad = [z for z in noises if not math.isfinite(z) or z < 0]
    if bad:
        raise ConfigError(f"--noise: a noise multiplier is a finite number >= 0 (0: no DP), got {bad[0]!r}")
    if len(set(noises)) != len(noises):
        raise ConfigError(f"--noise lists a noise multiplier twice: {', '.join(map(str, noises))}")
    return noises


def privacy_at(config: ExperimentConfig, noise: float, clip: float | None) -> ExperimentConfig:
    """``config`` with client-level DP at noise multiplier ``noise`` (none at all for 0)."""
    if noise == 0:
        privacy = PrivacySpec(dp="none", delta=config.privacy.delta, accountant=config.privacy.accountant)
    else:
        privacy = PrivacySpec(dp="client", clip=clip, noise=noise, delta=config.privacy.delta,
                              accountant=config.privacy.accountant)
    return config.model_copy(update={"privacy": privacy})


@dataclass(frozen=True)
class TaskView:
    """What scoring a model needs to know of the task: its name, its classes (or labels) and the
    target scale the models trained on (regression; ``UNSCALED`` otherwise)."""

    task: str
    classes: tuple[str, ...]
    target: TargetScale


@dataclass(frozen=True)
class Scored:
    """One model of one run scored on one site: the attack's AUC and the model's test metrics."""

    site: str
    model: str  # "global" or "personal"
    attack_auc: float | None
    metrics: dict[str, Metric]


def score_model(model, params, train_X, train_y, test_X, test_y, site: str, kind: str,
                view: TaskView | None = None) -> Scored:
    """Attack ``params`` with the site's training rows as members and its test rows as non-members
    (``train_y`` as the model trained on them, ``test_y`` as the data hold them)."""
    if view is not None and view.task != "binary":
        return _score_task(model, params, train_X, train_y, test_X, test_y, site, kind, view)
    test_p = model.predict_proba(params, test_X)
    members = row_losses(model.predict_proba(params, train_X), train_y)
    auc = membership_auc(members, row_losses(test_p, test_y))
    if not (np.isfinite(members).all() and np.isfinite(test_p).all()):
        return Scored(site, kind, None, {m: Metric(None, "diverged: NaN/Inf scores") for m in ("acc", "auc")})
    return Scored(site, kind, auc, binary_metrics(test_y, test_p, ranking=model.decision(params, test_X)))


def _score_task(model, params, train_X, train_y, test_X, test_y, site: str, kind: str, view: TaskView) -> Scored:
    """:func:`score_model` for the tasks other than binary: :func:`example_losses` and the task's metrics."""
    regression = view.task == "regression"
    members = example_losses(model, params, train_X, train_y)
    others = example_losses(model, params, test_X, view.target.forward(test_y) if regression else test_y)
    predicted = task_scores(model, params, test_X)
    if predicted is None or not (np.isfinite(members).all() and np.isfinite(others).all()):
        return Scored(site, kind, None, {m: Metric(None, "diverged: NaN/Inf scores") for m in utility_keys(view.task)})
    if regression:
        predicted = view.target.inverse(predicted)
    metrics = task_metrics(view.task, test_y, predicted, view.classes)
    return Scored(site, kind, membership_auc(members, others), {m: metrics[m] for m in utility_keys(view.task)})


def _check(config: ExperimentConfig, federation, methods, noises: list[float], clip: float | None) -> None:
    """Everything that would fail mid-audit, refused before training."""
    central = [spec.name for spec, _ in methods if spec.kind != "federated"]
    if central:
        raise ConfigError(f"--methods: {', '.join(central)} is a centralized setting; a privacy audit runs "
                          "federated methods (see `medfed methods`)")
    if any(z > 0 for z in noises) and clip is None:
        raise ConfigError("--clip C is needed: a noise multiplier above 0 turns on client-level DP, which "
                          "clips each site's update to L2 norm C")
    for z in sorted({0.0 if z == 0 else 1.0 for z in noises}):  # the plain study and, once, the private one
        check_study(privacy_at(config, z, clip), federation, methods)


def _run_repeat(config, federation, methods, noises, clip, repeat: int, progress, spent: dict) -> list[dict]:
    """Train every method at every noise on one repeat's split. ``spent`` keeps each (method,
    noise)'s epsilon per site: the same in every repeat, and a PLD accounting takes seconds."""
    sites = prepare_repeat(federation, config, repeat)
    # [harmonize] as medfed run applies it: the federation's fit, every site adjusted; regression
    # targets standardized as medfed run standardizes them
    views = ScaledViews(sites, config.scaling, repeat_harmonizer(config, federation, sites),
                        standardize_target=federation.task == "regression" and config.data.standardize_target)
    everyone = tuple(range(len(sites)))
    train, tests = views(everyone)
    view = TaskView(federation.task, federation.classes, views.target_scale(everyone))
    records = []
    for spec, opts in methods:
        for z in noises:
            if progress:
                progress(f"repeat {repeat + 1}/{config.repeats}: {spec.display}, noise {z:g}")
            plan = TrainingPlan.of(privacy_at(config, z, clip), federation)
            # the key of medfed run's run of this method: every z draws the same split and batches
            rng = KeyedRng(config.seed, (TRAIN_STREAM, repeat, name_key(spec.name)))
            record: dict[str, Any] = {"method": spec.name, "noise": z, "repeat": repeat}
            run = plan.federated(spec, opts, train, plan.initial(federation, repeat), rng)
            failure = federated_failure(run)
            if (spec.name, z) not in spent:
                spent[spec.name, z] = {e["site"]: e["epsilon"] for e in plan.ledger(spec, [d.name for d in train], repeat)}
            eps = spent[spec.name, z]
            record["epsilon"] = {s.name: eps.get(s.name, math.inf) for s in sites}
            record["failure"] = None if failure is None else failure.reason
            finite = run.train_loss[np.isfinite(run.train_loss)]
            # a model the noise swamped still scores (its numbers are real); the notes say so
            record["loss_rise"] = ((float(finite[0]), float(finite[-1])) if failure is None and finite.size
                                   and loss_rise(finite[0], finite[-1]) else None)
            scored = []
            if failure is None:
                for j, s in enumerate(sites):
                    models = ([("global", run.params)] if spec.global_model else []) + (
                        [("personal", run.personal[s.name])] if s.name in run.personal else [])
                    scored += [score_model(plan.model, p, train[j].X, train[j].y, tests[j], s.y_test, s.name, kind,
                                           view) for kind, p in models]
            record["scored"] = scored
            records.append(record)
    return records


def _rows(methods: list[tuple[Method, dict]], noises, site_names, records: list[dict],
          keys: tuple[str, ...]) -> list[dict]:
    """One row per method, noise, site and model: summaries over the repeats."""
    rows = []
    for spec, _ in methods:
        kinds = (["global"] if spec.global_model else []) + (["personal"] if spec.personal else [])
        for z in noises:
            runs = [r for r in records if r["method"] == spec.name and r["noise"] == z]
            for site in site_names:
                for kind in kinds:
                    found = [next((x for x in r["scored"] if x.site == site and x.model == kind), None) for r in runs]
                    why = [r["failure"] or f"no {kind} model at this site" for r in runs]
                    eps = runs[0]["epsilon"][site]  # the same in every repeat: (q, z, rounds, delta) fix it
                    rows.append({
                        "method": spec.name, "display": spec.display, "noise": z, "site": site, "model": kind,
                        "epsilon": None if not math.isfinite(eps) else eps,
                        "attack_auc": summarize([Metric(x.attack_auc) if x else Metric(None, w)
                                                 for x, w in zip(found, why)]),
                        **{m: summarize([x.metrics[m] if x else Metric(None, w) for x, w in zip(found, why)])
                           for m in keys},
                    })
    return rows


def run_privacy_audit(
    config: ExperimentConfig,
    audit: str,
    noises: Sequence[float],
    clip: float | None,
    *,
    federation=None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``config.methods`` at every noise multiplier and return the ``audit`` document
    (``membership`` or ``privacy``; the same runs, two views). ``config.privacy`` gives delta
    and the accountant; its own dp/noise settings are replaced by ``noises`` and ``clip``."""
    if audit not in AUDITS:
        raise ConfigError(f"audit must be one of {', '.join(AUDITS)}, got {audit!r}")
    started = time.perf_counter()
    noises = parse_noises(noises)
    federation = federation if federation is not None else load_federation(config.data)
    methods = resolve_methods(config.methods, config.method_options, config.pipelines)
    _check(config, federation, methods, noises, clip)
    spent: dict = {}
    records = [rec for repeat in range(config.repeats)
               for rec in _run_repeat(config, federation, methods, noises, clip, repeat, progress, spent)]
    return {
        "audit": audit,
        "dataset": federation.name,
        "task": federation.task,
        "task_source": federation.task_source,
        "classes": list(federation.classes),
        "metrics": list(utility_keys(federation.task)),  # the test metrics every row holds
        "attribution": federation.attribution,
        "attack": "loss threshold (Yeom et al., 2018): members = training rows, non-members = test rows",
        "dp": "client-level (McMahan et al., 2018); noise 0 = no DP",
        "clip": clip,
        "noises": noises,
        "delta": config.privacy.delta,
        "accountant": config.privacy.accountant,
        "sites": [{"name": s.name, "n": s.n} for s in federation.sites],
        "seed": config.seed,
        "repeats": config.repeats,
        "std_ddof": STD_DDOF,
        "config": config.model_dump(mode="json"),
        "versions": package_versions(),
        "runtime_s": time.perf_counter() - started,
        "notes": sorted({f"{r['method']} at noise {r['noise']:g}, repeat {r['repeat'] + 1}: {r['failure']}"
                         for r in records if r["failure"]}) + _rise_notes(records, config.repeats),
        "rows": _rows(methods, noises, list(federation.site_names), records, utility_keys(federation.task)),
    }


def _rise_notes(records: list[dict], repeats: int) -> list[str]:
    """One note per (method, noise) whose training loss ended above LOSS_RISE_WARNING x its start."""
    rises: dict[tuple[str, float], list[tuple[float, float]]] = {}
    for r in records:
        if r["loss_rise"] is not None:
            rises.setdefault((r["method"], r["noise"]), []).append(r["loss_rise"])
    return [f"{method} at noise {z:g}: the training loss ended above {LOSS_RISE_WARNING:g}x where it started in "
            f"{len(cases)} of {repeats} repeat(s) (from {cases[0][0]:.4g} to at most {max(e for _, e in cases):.4g}); "
            + ("the noise may swamp this model (a larger clip, budget or cohort lowers it)" if z > 0 else
               "the learning rate may be too large")
            for (method, z), cases in rises.items()]


def worst_membership(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The row with the highest mean attack AUC (the one a pre-flight check names), or None."""
    scored = [r for r in doc["rows"] if r["attack_auc"]["mean"] is not None]
    return max(scored, key=lambda r: r["attack_auc"]["mean"], default=None)


# --------------------------------------------------------------------------- reports


def epsilon_text(eps: float | None) -> str:
    return "inf" if eps is None else f"{eps:.3g}"


def task_of(doc: dict[str, Any]) -> str:
    """The task of an audit document (documents before tasks: binary)."""
    return doc.get("task", "binary")


# per task, the one test metric a membership table shows beside the attack AUC and the utility plot draws
UTILITY = {"binary": "auc", "multiclass": "macro_auc", "multilabel": "macro_auc", "regression": "r2",
           "segmentation": "dice"}


def shown_columns(doc: dict[str, Any]) -> tuple[str, ...]:
    """The summaries an audit's table shows after method, model, noise, epsilon and site: the
    task's two headline metrics (privacy), the attack AUC and :data:`UTILITY` (membership)."""
    from medfed.experiments.audit import SCREEN_METRICS

    task = task_of(doc)
    return ("attack_auc", UTILITY[task]) if doc["audit"] == "membership" else SCREEN_METRICS[task]


def header_of(column: str) -> str:
    return "Attack AUC" if column == "attack_auc" else f"Test {metric_label(column)}"


def table_cells(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and the rows every report of ``doc`` shows (screen, Markdown)."""
    shown = shown_columns(doc)
    header = ["Method", "Model", "Noise", "Epsilon", "Site", *(header_of(c) for c in shown)]
    rows = [[r["display"], r["model"], f"{r['noise']:g}", epsilon_text(r["epsilon"]), r["site"],
             *(format_metric(r[c]) for c in shown)] for r in doc["rows"]]
    return header, rows


def _caption(doc: dict[str, Any]) -> str:
    what = (f"Membership inference, {doc['attack']}." if doc["audit"] == "membership"
            else "Utility against privacy spent per site.")
    return (f"{what} DP: {doc['dp']}, clip {doc['clip']}, delta {doc['delta']:g}, accountant {doc['accountant']}. "
            f"Mean ± sample std over {doc['repeats']} repeat(s), seed {doc['seed']}.")


def audit_markdown(doc: dict[str, Any]) -> str:
    header, rows = table_cells(doc)
    lines = [f"# {doc['audit'].capitalize()} audit: {doc['dataset']}", "", _caption(doc), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if doc["notes"]:
        lines += ["", *[f"- {n}" for n in doc["notes"]]]
    if doc.get("attribution"):
        lines += ["", f"Data: {doc['attribution']}"]
    return "\n".join(lines) + "\n"


def audit_csv(doc: dict[str, Any]) -> str:
    """One line per method, noise, site and model; every summary as mean, std, n."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    summaries = ("attack_auc", *doc.get("metrics", ("acc", "auc")))
    writer.writerow(["method", "model", "noise", "epsilon", "site",
                     *(f"{c}_{k}" for c in summaries for k in ("mean", "std", "n"))])
    for r in doc["rows"]:
        writer.writerow([r["method"], r["model"], repr(r["noise"]), "inf" if r["epsilon"] is None else repr(r["epsilon"]),
                         r["site"], *("" if r[c][k] is None else (repr(r[c][k]) if k != "n" else r[c][k])
                                      for c in summaries for k in ("mean", "std", "n"))])
    return buf.getvalue()


def utility_figure(doc: dict[str, Any]):
    """Mean test AUC (the task's :data:`UTILITY`: macro-AUC, R2, Dice) over sites (global model)
    against epsilon per method, log-x; the run without DP (epsilon infinite) is a dashed line at
    its value, not a point on the axis."""
    from medfed.experiments.plots import _figure, curve_style

    key = UTILITY[task_of(doc)]

    fig = _figure(figsize=(6, 4))
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(r["display"] for r in doc["rows"]))
    for i, name in enumerate(methods):
        style = curve_style(i)
        points: dict[float, list[float]] = {}
        plain: list[float] = []
        for r in doc["rows"]:
            if r["display"] != name or r["model"] != "global" or r[key]["mean"] is None:
                continue
            (plain if r["epsilon"] is None else points.setdefault(r["epsilon"], [])).append(r[key]["mean"])
        xs = sorted(points)
        if xs:
            ax.plot(xs, [np.mean(points[x]) for x in xs], marker="o", label=name, color=style.get("color"))
        if plain:
            ax.axhline(np.mean(plain), linestyle="--", color=style.get("color"), label=f"{name}, no DP")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon per site (delta = {doc['delta']:g})")
    ax.set_ylabel(f"test {metric_label(key)}, mean over sites")
    ax.set_title(f"{doc['dataset']}: utility against privacy")
    ax.legend(fontsize="small")
    return fig


def audit_files(doc: dict[str, Any]) -> dict[str, Callable[[], bytes]]:
    """The audit's files (``membership.*`` or ``privacy.*``) as producers of their bytes."""
    stem = doc.get("audit", "membership")
    files = {
        f"{stem}.json": lambda: (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode(),
        f"{stem}.csv": lambda: audit_csv(doc).encode(),
        f"{stem}.md": lambda: audit_markdown(doc).encode(),
    }
    if stem == "privacy":
        from medfed.experiments.plots import _render

        files["privacy.png"] = lambda: _render(utility_figure(doc), "png")
    return files


def write_audit_report(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write the audit's files to ``out_dir``, all or nothing."""
    return write_atomically(out_dir, audit_files(doc))
