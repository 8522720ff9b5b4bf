"""Round reports a site adds to its upload: simulated latency and the local model's accuracy.

Dynamic fusion (Zhang et al., 2021b) needs to know, per site and round, how long the site
took and how well its local model does. In simulation the time is drawn from a per-site
latency profile; the accuracy is measured on the site's own training rows (nothing but the
two numbers leaves the site).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from medfed.client.local import LocalData, LocalTraining
from medfed.client.upload import Upload
from medfed.models.logistic import Params
from medfed.rng import KeyedRng

LATENCY_STREAM = 7  # rng child key for latency draws, apart from the rule's own draws


def simulated_latency(mean_seconds: float, jitter: float, rng: KeyedRng) -> float:
    """One round's latency: ``mean * exp(jitter * z - jitter² / 2)`` with z ~ N(0, 1).

    Log-normal with the given mean, so slow rounds are occasional and long-tailed, as network
    and compute delays are; jitter 0 gives exactly ``mean`` every round.
    """
    if jitter == 0:
        return float(mean_seconds)
    z = rng.child(LATENCY_STREAM).generator.standard_normal()
    return float(mean_seconds * np.exp(jitter * z - 0.5 * jitter**2))


# the tasks local_acc is defined for: one decision per class or label (regression values and
# masks have no accuracy to set a bar on)
ACCURACY_TASKS = ("binary", "multiclass", "multilabel")


def training_accuracy(task: str, probabilities: np.ndarray, y: np.ndarray) -> float:
    """The share of correct decisions: binary at probability 0.5 (as it always was), multiclass
    at the most probable class (the first on ties), multilabel the mean over rows and labels of
    each label's decision at 0.5 (per-label accuracy, averaged)."""
    if task == "multiclass":
        return float(np.mean(np.argmax(probabilities, axis=1) == np.asarray(y)))
    if task in ("binary", "multilabel"):
        return float(np.mean((probabilities >= 0.5) == (np.asarray(y) >= 0.5)))
    raise ValueError(f"local accuracy is defined for {', '.join(ACCURACY_TASKS)} tasks, not {task}")


def with_round_report(rule, latencies: Mapping[str, float], jitter: float, default_latency: float = 1.0):
    """Wrap a local rule so its upload also reports ``latency`` (s) and ``local_acc``.

    ``local_acc`` is the training accuracy (:func:`training_accuracy`: binary at 0.5, multiclass at
    the argmax, multilabel per label at 0.5) of the site's model after its local work: the global
    model plus its delta (or the uploaded parameters).
    """

    def reporting_rule(
        global_params: Params, data: LocalData, config: LocalTraining, state: Any, rng: KeyedRng, **message
    ) -> tuple[Upload, Any]:
        upload, state = rule(global_params, data, config, state, rng, **message)
        if upload.kind == "params":
            local = upload.payload
        elif upload.kind == "delta":
            local = {k: global_params[k] + upload.payload[k] for k in global_params}
        else:  # a gradient: the model the site evaluated is the global one
            local = global_params
        metrics = dict(upload.metrics)
        task = getattr(config.model, "task", "binary")
        metrics["local_acc"] = training_accuracy(task, config.model.predict_proba(local, data.X), data.y)
        metrics["latency"] = simulated_latency(latencies.get(data.name, default_latency), jitter, rng)
        return Upload(upload.site, upload.payload, upload.n_examples, upload.kind, metrics, upload.extras), state

    return reporting_rule
