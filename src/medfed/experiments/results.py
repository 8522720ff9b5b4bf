"""Results as data: the ``results.json`` document and the Table 2 layout built from it.

Everything a report shows is derived from the document, so the screen table, the CSV and
the Markdown cannot disagree with the JSON.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import numpy as np

from medfed.experiments.harmonization import harmonization_document
from medfed.experiments.harness import THRESHOLD_ROWS, Cell, ExperimentRun
from medfed.experiments.metrics import (
    BINARY,
    DEFAULT_THRESHOLD,
    MULTICLASS,
    PER_OUTPUT,
    Metric,
    metric_label,
    metric_set,
)
from medfed.experiments.saved_model import models_document
from medfed.models.registry import task_model

STD_DDOF = 1  # sample standard deviation over repeats


def summarize(values: list[Metric]) -> dict[str, Any]:
    """Mean ± sample std over the repeats where the metric is defined; undefined ones stay null."""
    defined = [m.value for m in values if m.value is not None]
    out: dict[str, Any] = {
        "mean": float(np.mean(defined)) if defined else None,
        "std": float(np.std(defined, ddof=STD_DDOF)) if len(defined) > STD_DDOF else None,
        "values": [m.value for m in values],
        "n": len(defined),
    }
    reasons = sorted({m.reason for m in values if m.reason})
    if reasons:
        out["undefined_reason"] = "; ".join(reasons)
    return out


def _row(cell: Cell, task: str = BINARY.task) -> dict[str, Any]:
    reasons = sorted({r for r in cell.skipped if r})
    row = {
        "setting": cell.setting,
        "method": cell.method,
        "evaluation": cell.evaluation,
        "model": cell.model,
        "train_site": cell.train_site,
        "test_site": cell.test_site,
        "computable": any(r is None for r in cell.skipped),
        "reason": "; ".join(reasons) if reasons else None,
        # repeats whose model diverged (loss, parameters or scores NaN/Inf), with the round
        "diverged": list(cell.diverged),
        "warnings": list(cell.warnings),
        "metrics": {m: summarize(cell.metrics[m]) for m in metric_set(task).keys},
        "threshold": threshold_record(cell),
    }
    if task in PER_OUTPUT:  # multiclass: {"sen": {class: summary}, ...}; multilabel: {"auc": {label: summary}}
        row["per_label" if task == "multilabel" else "per_class"] = {
            m: {k.split(":", 1)[1]: summarize(v) for k, v in cell.metrics.items() if k.startswith(m + ":")}
            for m in PER_OUTPUT[task]}
    return row


def threshold_record(cell: Cell) -> dict[str, Any] | None:
    """The decision threshold of each repeat of a row (``None`` where a repeat has no model to
    threshold), on the logit and the probability scale, and where it was chosen."""
    if not any(cell.thresholds):
        return None
    rule = next(t.rule for t in cell.thresholds if t is not None)
    return {
        "rule": rule,
        "chosen_on": "fixed" if rule == DEFAULT_THRESHOLD else THRESHOLD_ROWS[cell.threshold_rows],
        "logit": [None if t is None else t.logit for t in cell.thresholds],
        "probability": [None if t is None else t.probability for t in cell.thresholds],
    }


def package_versions() -> dict[str, str]:
    """Versions of what computed the numbers: always numpy; torch and the image readers when used."""
    import sys

    out = {"python": platform.python_version()}
    used = [m for m in ("torch", "nibabel", "pydicom", "PIL", "scipy") if m in sys.modules]
    for pkg in ("medfed", "numpy", "pydantic", *("Pillow" if m == "PIL" else m for m in used)):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def environment(config) -> dict[str, Any]:
    """Where the numbers were computed: the platform, and for a torch model the intra-op thread
    count it computes with (its ``threads`` option: the same count gives the same bits) and the
    device it ran on."""
    out: dict[str, Any] = {"platform": platform.platform(), "torch": None}
    if config.model != "logistic":
        import torch

        device = config.model_options.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # the count the model computes with (its own option, default 1), not torch's global one
        out["torch"] = {"threads": int(config.model_options.get("threads", 1)), "device": device}
    return out


def results_document(run: ExperimentRun, command: str | None = None) -> dict[str, Any]:
    """The complete, JSON-serializable record of a run (config, seeds, versions, per-site rows).

    ``command`` is the command line that started the run (the CLI passes it; None from Python).
    """
    fed = run.federation
    config = run.config
    task = getattr(fed, "task", BINARY.task)
    histories: dict[str, dict[str, Any]] = {}
    for h in run.histories:
        entry = histories.setdefault(
            h.setting, {"communication_rounds": h.rounds, "bytes_up_per_run": h.bytes_up, "train_loss": []}
        )
        entry["train_loss"].append([float(v) if np.isfinite(v) else None for v in h.train_loss])
        if h.evaluation:
            entry.setdefault("evaluation", []).append(h.evaluation)
        if h.rounds_notes:
            entry.setdefault("server_notes", []).append({"repeat": h.repeat, "rounds": h.rounds_notes})
        entry.setdefault("bytes_up_by_site", []).append(dict(h.bytes_by_site))  # per repeat: site -> bytes
        if h.secure_rounds:
            entry.setdefault("secure_rounds", []).append({"repeat": h.repeat, "rounds": h.secure_rounds})
    communication = {}
    for h in run.histories:
        entry = communication.setdefault(h.setting, {"rounds": h.rounds, "bytes_up": []})
        entry["bytes_up"].append(int(h.bytes_up))
    return {
        "dataset": fed.name,
        "description": fed.description,
        "attribution": fed.attribution,
        "seed": config.seed,
        "repeats": config.repeats,
        "split": "predefined" if fed.has_predefined_split else f"stratified {1 - config.test_fraction:.0%}/{config.test_fraction:.0%} per site",
        "scaling": config.scaling,
        "impute": fed.impute,
        "std_ddof": STD_DDOF,
        "positive_label": fed.positive_label if task == BINARY.task else None,
        "task": task,
        # how the task was decided: "given" (--task, a data set's own) or why it was inferred
        "task_source": getattr(fed, "task_source", "given"),
        "classes": list(getattr(fed, "classes", ())) or None,  # multiclass: class index k is classes[k]
        "metrics": list(metric_set(task).keys),  # the keys every row's "metrics" holds
        "threshold": config.evaluation.threshold,
        "sites": fed.site_summaries(),
        "features": list(fed.feature_names),
        "sample_shape": list(fed.sample_shape),
        "model": {"name": config.model, "options": dict(config.model_options),
                  **({} if task == BINARY.task else {"fitted": task_model(config.model, task)})},
        "methods": [
            {"name": spec.name, "display": spec.display, "kind": spec.kind, "uploads": spec.uploads or None,
             "reference": spec.reference, "family": spec.family, "personal": spec.personal, "options": opts,
             "caveat": spec.caveat(opts) if spec.caveat else None}
            for spec, opts in run.methods
        ],
        "config": config.model_dump(mode="json"),
        "command": command,
        "versions": package_versions(),
        "environment": environment(config),
        "runtime_s": run.runtime_s,
        "setting_runtime_s": run.setting_runtime_s,
        "workers": run.workers,
        "warnings": run.warnings,
        "data_info": fed.info,
        # a multi-task study (--label-column-site, mni-phantom task=multitask): the target each site's labels are
        "site_targets": fed.info.get("site_targets"),
        "results": [_row(c, task) for c in run.cells],
        "histories": histories,
        # what crossed the network per federated setting: rounds per run and bytes uploaded by all
        # sites per run (mean over repeats; FedSGD's many small rounds are visible here)
        "communication": [
            {"setting": setting, "rounds": e["rounds"], "bytes_up_per_run": float(np.mean(e["bytes_up"])),
             "bytes_up_values": e["bytes_up"]}
            for setting, e in communication.items()
        ],
        # with --save-model: the file of each setting's model (repeat 1) and why others have none
        "models": models_document(run.models, config) if config.save_model else None,
        "privacy": privacy_document(run),
        # with [harmonize]: what was fitted and the site effect before and after it
        "harmonization": harmonization_document(config, fed, run.harmonization),
        "target_scale": target_scale_document(run, task),
    }


def target_scale_document(run: ExperimentRun, task: str) -> dict[str, Any] | None:
    """A regression run's target standardization (``[data] standardize_target``): whether it was
    on and, per repeat, each training group's scale (``train_sites``, rows ``n``, ``mean``,
    ``std``: Single's one site, Mix's and the federated settings' all sites, LOSO's all but one).
    Every metric and prediction is on the target's own scale. None for other tasks."""
    if task != "regression":
        return None
    on = run.config.data.standardize_target
    return {
        "standardized": on,
        "note": ("each model trains on (y - mean) / std of its training sites' training rows (pooled from their "
                 "n, sum y, sum y^2); predictions are mapped back before every metric") if on else
                "targets trained as they are ([data] standardize_target = false)",
        "repeats": run.target_scales if on else [],
    }


def privacy_document(run: ExperimentRun) -> dict[str, Any]:
    """The run's protection in numbers: what leaves a site (the sharing policy of each method),
    the channel's stages, the DP parameters and each site's ledger (one entry per site per
    federated run and repeat: ``site``, ``mode``, ``clip``, ``noise_multiplier``,
    ``sampling_rate``, ``steps``, ``delta``, ``accountant``, ``epsilon``), what each setting keeps at
    the sites (``sharing``) and each site's bytes per round (``bytes_up_per_round_by_site``)."""
    p = run.config.privacy
    clipped = p.dp in ("client", "distributed") or p.secure_aggregation
    doc: dict[str, Any] = {"dp": p.dp, "secure_aggregation": p.secure_aggregation, "compress": run.config.compress,
                           "channel": ["sharing policy"] + (["clip"] if clipped else [])
                           + (["noise (distributed)"] if p.dp == "distributed" else [])
                           + ([f"{'quantize' if p.secure_aggregation else 'compress'} ({run.config.compress})"]
                              if run.config.compress != "none" else [])
                           + (["mask"] if p.secure_aggregation else []),
                           "sharing": sharing_by_setting(run), "bytes_up_per_round_by_site": bytes_per_round(run)}
    if p.secure_aggregation:
        doc["secure"] = secure_document(run)
    if p.dp != "none":
        doc.update({"clip": p.clip, "noise_multiplier": p.noise, "target_epsilon": p.target_epsilon,
                    "delta": p.delta, "accountant": p.accountant,
                    "sampling": f"Poisson, rate {run.config.training.fraction_fit:g} (fraction_fit)"})
        worst: dict[str, float] = {}
        for e in run.privacy:
            worst[e["setting"]] = max(worst.get(e["setting"], 0.0), e["epsilon"])
        doc["epsilon_by_setting"] = {k: (v if np.isfinite(v) else None) for k, v in worst.items()}  # None: no bound
        # the noise multiplier each setting ran with: given, or chosen by --target-epsilon (then
        # per setting, since methods differ in steps); a list where repeats or sites differ
        noise: dict[str, list[float]] = {}
        for e in run.privacy:
            z = noise.setdefault(e["setting"], [])
            if e["noise_multiplier"] not in z:
                z.append(e["noise_multiplier"])
        doc["noise_by_setting"] = {k: (v[0] if len(v) == 1 else v) for k, v in noise.items()}
    doc["ledger"] = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in e.items()}
                     for e in run.privacy]
    return doc


def sharing_by_setting(run: ExperimentRun) -> dict[str, dict[str, Any]]:
    """What each federated setting's uploads carry: every parameter, or all but the ones its
    sharing policy keeps at the sites (FedBN's norm layers, FedPer's head), named."""
    out: dict[str, dict[str, Any]] = {}
    for h in run.histories:
        if h.setting not in out:
            out[h.setting] = {"policy": "all parameters" if not h.private else "private parameters stay at the sites",
                              "private": list(h.private)}
    return out


def bytes_per_round(run: ExperimentRun) -> dict[str, dict[str, float]]:
    """Each site's mean upload per communication round, per setting (over repeats and rounds)."""
    totals: dict[str, dict[str, list[float]]] = {}
    for h in run.histories:
        for site, n in h.bytes_by_site.items():
            totals.setdefault(h.setting, {}).setdefault(site, []).append(n / max(1, h.rounds))
    return {setting: {site: float(np.mean(v)) for site, v in by_site.items()} for setting, by_site in totals.items()}


def secure_document(run: ExperimentRun) -> dict[str, Any]:
    """Secure aggregation in numbers: the protocol's parameters as configured, the ring (its
    bits per setting, the range of each summed term; the fixed-point scale, or the quantization's
    bits, levels and variance), and per setting the rounds' thresholds, degrees and the sites that
    dropped inside a round (recovered from their neighbours' shares)."""
    from medfed.comm.secagg import RING_BITS
    from medfed.comm.secure import quantization_bits

    p, t = run.config.privacy, run.config.training
    bits = quantization_bits(run.config.compress)
    doc: dict[str, Any] = {
        "protocol": "SecAgg+ (Bonawitz et al., 2017; Bell et al., 2020): X25519, HKDF-SHA256, ChaCha20 masks, "
                    "Shamir shares of seeds and keys",
        "threshold": p.secure_threshold or "floor(k/2) + 1", "degree": p.secure_degree or "2 ceil(log2 K)",
        "ring_bits": RING_BITS, "clip": p.clip, "min_sites": max(t.min_sites, 2),
        "scale": "2^floor(log2(2^62 / K)) per unit of each term's range (K: the round's masked sites)",
        "resolution": "range * K / (2 scale) per entry of the sum",
        "quantization": None,
        "screening": "none at the server (it sees no upload): each site clips to clip and refuses to mask a "
                     "non-finite upload",
        "settings": {},
    }
    if bits:  # quantized in the ring: the ring's width follows K, so each setting states its own
        doc.update(ring_bits=None, scale=None, resolution="unbiased; variance at most K (2 range / levels)^2 / 4 "
                   "per entry of the sum (scalar terms: 48-bit digits)",
                   quantization={"compress": run.config.compress, "bits": bits, "levels": 2**bits - 1,
                                 "ring": "Z_2^r, r the smallest of 16, 32, 64 with r >= bits + ceil(log2 K)"})
    for h in run.histories:
        if not h.secure_rounds:
            continue
        entry = doc["settings"].setdefault(h.setting, {"range": h.secure_rounds[0].get("range"),
                                                       "site_noise_std": h.secure_rounds[0].get("site_noise_std"),
                                                       "quantization": h.secure_rounds[0].get("quantization"),
                                                       "thresholds": [], "degrees": [], "ring_bits": [],
                                                       "skipped_rounds": 0,
                                                       "dropped_after_sharing": {}, "dropped_after_masking": {}})
        for r in h.secure_rounds:
            for key, plural in (("threshold", "thresholds"), ("degree", "degrees"), ("ring_bits", "ring_bits")):
                if key in r and r[key] not in entry[plural]:
                    entry[plural].append(r[key])
            entry["skipped_rounds"] += r.get("skipped") is not None
            for key in ("dropped_after_sharing", "dropped_after_masking"):
                for site in r.get(key, ()):
                    entry[key][site] = entry[key].get(site, 0) + 1  # rounds in which it dropped there
    return doc


def privacy_lines(doc: dict[str, Any]) -> list[str]:
    """One line per private setting: its epsilon at delta, for the reader under the table."""
    p = doc.get("privacy") or {}
    lines = []
    if p.get("secure_aggregation"):
        s = p["secure"]
        drops = sum(n for e in s["settings"].values() for key in ("dropped_after_sharing", "dropped_after_masking")
                    for n in e[key].values())
        thresholds = sorted({t for e in s["settings"].values() for t in e["thresholds"]})
        rings = sorted({r for e in s["settings"].values() for r in e.get("ring_bits", ())}) or [s["ring_bits"]]
        q = s.get("quantization")
        ring = "/".join(map(str, rings)) + "-bit ring" + (f", {q['bits']}-bit quantized" if q else "")
        lines.append(f"secure aggregation (SecAgg+, {ring}, clip {s['clip']:g}): the server saw "
                     f"sums only; threshold {'/'.join(map(str, thresholds)) or '-'}; {drops} in-round dropout(s) "
                     "recovered")
    if p.get("dp", "none") == "none":
        return lines
    chosen = p.get("noise_by_setting", {}) if p.get("target_epsilon") is not None else {}

    def noise_text(setting: str) -> str:
        z = chosen.get(setting)
        if z is None:
            return ""
        return f" (z = {z:.3g} chosen)" if isinstance(z, float) else f" (z = {min(z):.3g}-{max(z):.3g} chosen)"

    parts = [f"{setting} eps = {'inf' if eps is None or not np.isfinite(eps) else f'{eps:.3g}'}{noise_text(setting)}"
             for setting, eps in p.get("epsilon_by_setting", {}).items()]
    return lines + [f"{p['dp']}-level DP (clip {p['clip']:g}, delta {p['delta']:g}, {p['accountant']}): "
                    + "; ".join(parts)]


def harmonization_lines(doc: dict[str, Any]) -> list[str]:
    """One line when the features were harmonized: how, and the site effect before and after."""
    h = doc.get("harmonization")
    if not h:
        return []
    if h["method"] == "frequency":
        how = (f"harmonized in the frequency domain (low band {h['band']:g} cycles/pixel, strength {h['strength']:g}), "
               "fitted per repeat on the training images; site effect on the test images' intensity quantiles")
    else:
        covariates = ", ".join(h["covariates"]) or "no covariates"
        how = (f"harmonized with federated ComBat ({'empirical Bayes' if h['empirical_bayes'] else 'no EB'}; "
               f"preserving {covariates}), fitted per repeat on the training rows; site effect on the test rows")
    if "before" not in h:  # deployed
        return [f"{how.split(', fitted per repeat')[0]}, fitted once on the joined sites' training rows; site effect "
                "not measured (the test rows stay at their sites)"]
    b, a = h["before"], h["after"]
    return [(f"{how}: between-site variance share {b['variance_ratio_mean']:.3f} -> {a['variance_ratio_mean']:.3f}, "
             f"site-classifier AUC {b['site_auc_mean']:.3f} -> {a['site_auc_mean']:.3f}")]


def data_note_lines(doc: dict[str, Any]) -> list[str]:
    """Which target each site predicts in a multi-task study, and what the loader left out
    (``--skip-bad``): counted, with the first reasons, never silent."""
    targets = doc.get("site_targets") or {}
    lines = [("sites predict different targets: " + ", ".join(f"{site} predicts {target!r}"
                                                             for site, target in targets.items()))] if targets else []
    info = doc.get("data_info") or {}
    skipped = info.get("skipped") or []
    if not skipped:
        return lines
    lines += [f"{len(skipped)} bad file(s) skipped (--skip-bad):"]
    lines += [f"  {s.get('path')}: {s.get('reason')}" for s in skipped[:5]]
    if len(skipped) > 5:
        lines.append(f"  ... and {len(skipped) - 5} more, listed in results.json (data_info.skipped)")
    return lines


def server_note_lines(doc: dict[str, Any]) -> list[str]:
    """One line per setting whose server refused uploads or skipped rounds, for the reader."""
    lines = []
    for setting, entry in doc["histories"].items():
        notes = entry.get("server_notes")
        if not notes:
            continue
        rejected: dict[str, int] = {}
        missing: dict[str, int] = {}
        skipped = 0
        example = None
        for repeat in notes:
            for r in repeat["rounds"]:
                skipped += r["skipped"] is not None
                for site, reason in r["rejected"].items():
                    rejected[site] = rejected.get(site, 0) + 1
                    example = example or f"{site}: {reason}"
                for site in r.get("missing", {}):
                    missing[site] = missing.get(site, 0) + 1
        parts = [f"{n} upload(s) from {site}" for site, n in sorted(rejected.items())]
        if rejected or not missing:
            text = f"{setting}: the server rejected " + (", ".join(parts) if parts else "no uploads")
        else:
            text = f"{setting}:"
        if missing:
            absent = ", ".join(f"{site} in {n} round(s)" for site, n in sorted(missing.items()))
            text += ("; " if rejected else " ") + f"sites sent nothing: {absent} (reasons in results.json)"
        if skipped:
            text += f"; {skipped} round(s) kept the global model (too few valid uploads)"
        if example:
            text += f" (e.g. {example})"
        lines.append(text)
    return lines


def format_bytes(n: float) -> str:
    """Bytes in decimal units (kB = 1000 B), three significant digits."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def communication_lines(doc: dict[str, Any]) -> list[str]:
    """One line: each federated setting's rounds and uploaded bytes per run, so that a method
    that communicates ten times more (FedSGD) cannot hide behind equal metrics."""
    entries = doc.get("communication") or []
    if not entries:
        return []
    parts = [f"{e['setting']} {e['rounds']} rounds, {format_bytes(e['bytes_up_per_run'])}" for e in entries]
    return ["uploaded per run (all sites, mean over repeats): " + "; ".join(parts)]


def threshold_lines(doc: dict[str, Any]) -> list[str]:
    """One line when the decision threshold is chosen (not 0.5): by which rule, and where."""
    rule = doc.get("threshold", DEFAULT_THRESHOLD)
    if rule == DEFAULT_THRESHOLD:
        return []
    what = {"youden": "the largest TPR - FPR", "prevalence": "predicted-positive fraction = prevalence"}[rule]
    return [(f"decision threshold: {rule} ({what}) on training rows only: a federated model's on each test site's "
             "own, a centralized model's on its own; every row's values in results.json (threshold)")]


def format_metric(summary: dict[str, Any], digits: int = 3) -> str:
    if summary["mean"] is None:
        return "n/a"
    text = f"{summary['mean']:.{digits}f}"
    if summary["std"] is not None:
        text += f" ± {summary['std']:.{digits}f}"
    return text


def table_rows(doc: dict[str, Any], keys: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Rows in the survey's Table 2 order: grouped by test site; Cross rows first, labelled by
    their training site, then the other settings in the order they were run, each personal
    model after its global one. Leave-one-site-out rows follow in blocks of their own, one per
    held-out site, labelled "(unseen)", then (with harmonization) "(unseen, adapted)": the
    held-out site harmonized by itself. ``cells`` hold the metrics ``keys`` (default: the
    task's headline metrics, what the terminal shows)."""
    screen = keys or metric_set(doc.get("task")).screen
    order = {m["display"]: i for i, m in enumerate(doc["methods"])}
    caveats = {m["display"]: m["caveat"] for m in doc["methods"] if m.get("caveat")}
    rows = []
    blocks = [(site, "split") for site in (s["name"] for s in doc["sites"])]
    blocks += [(site, evaluation) for evaluation in ("loso", "loso+adapt") for site, _ in blocks]
    by_block: dict[tuple[str, str], list[dict[str, Any]]] = {}  # one pass: 10,000 sites x 10,000 rows is not
    for r in doc["results"]:
        by_block.setdefault((r["test_site"], r.get("evaluation", "split")), []).append(r)
    for site, evaluation in blocks:
        block = by_block.get((site, evaluation), [])
        block.sort(key=lambda r: (order.get(r["setting"], 99), r.get("model") == "personal", r["train_site"] or ""))
        for r in block:
            label = r["setting"] if r["setting"] != "Cross" else f"Cross ({r['train_site']} tr)"
            if r.get("model") == "personal":
                label += " · personal"
            if not r["computable"]:
                cells = ["diverged" if r.get("diverged") else "not computable"] * len(screen)
            else:
                cells = [format_metric(r["metrics"][m]) for m in screen]
            notes = [r["reason"]] if r["reason"] else []
            notes += [caveats[r["setting"]]] if r["setting"] in caveats else []
            notes += r.get("warnings", [])
            notes += [f"{metric_label(m)}: {r['metrics'][m]['undefined_reason']}" for m in screen
                      if r["computable"] and r["metrics"][m].get("undefined_reason")]
            shown = {"split": site, "loso": f"{site} (unseen)"}.get(evaluation, f"{site} (unseen, adapted)")
            rows.append({"test_site": shown, "label": label, "cells": cells, "notes": notes, "setting": r["setting"]})
    return rows


def task_lines(doc: dict[str, Any]) -> list[str]:
    """What a multiclass or regression run fitted and where its other numbers are (binary: none,
    as every run before tasks existed)."""
    task = doc.get("task", BINARY.task)
    if task == BINARY.task:
        return []
    model = doc["model"]
    fitted = model.get("fitted", model["name"])
    line = (f"task: {task} ({doc.get('task_source', 'given')}); model {fitted}"
            + (f" (--model {model['name']} for this task)" if fitted != model["name"] else ""))
    if task == MULTICLASS.task:
        line += f"; classes {', '.join(doc['classes'])}; per-class sensitivity and specificity in results.json"
    elif task == "multilabel":
        line += f"; labels {', '.join(doc['classes'])}; per-label AUC in results.json"
    return [line]
