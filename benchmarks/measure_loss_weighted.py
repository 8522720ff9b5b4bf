"""How far loss_weighted's weights depart from the example weights, per temperature (issue 8 §1).

For each data set and temperature: over 3 repeats and every round, the largest |w_k - n_k/n|
(mean and max over rounds), the largest ratio between two sites' weight per example, and the
mean over test sites of ACC and AUC next to FedAvg's. The numbers behind the default
temperature in :func:`medfed.server.weighting.loss_weighted`.
Run: PYTHONPATH=src python benchmarks/measure_loss_weighted.py [TEMPERATURE ...]
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from medfed.experiments.config import build_config
from medfed.experiments.harness import ScaledViews, TrainingPlan, load_federation, prepare_repeat, run_experiment
from medfed.methods import resolve_methods
from medfed.experiments.results import results_document
from medfed.rng import KeyedRng

CASES = [
    ("adni-like", {}),
    ("breast-cancer", {"partition": "dirichlet", "alpha": 0.1, "n_sites": 5}),
    ("breast-cancer", {"partition": "dirichlet", "alpha": 0.5, "n_sites": 5}),
    ("heart-disease", {}),
]


def _mean_metric(doc, setting: str, key: str) -> float:
    values = [r["metrics"][key]["mean"] for r in doc["results"] if r["setting"] == setting]
    return float(np.mean([v for v in values if v is not None]))


def main(temperatures: list[float]) -> None:
    warnings.simplefilter("ignore")  # single-class test sites of the Dirichlet splits
    for dataset, options in CASES:
        print(f"== {dataset} {options}")
        for T in temperatures:
            method_options = {"loss_weighted": {"temperature": T}}
            config = build_config({"data": {"dataset": dataset, "options": options},
                                   "methods": ["fedavg", "loss_weighted"], "repeats": 3,
                                   "method_options": method_options})
            federation = load_federation(config.data)
            plan = TrainingPlan.of(config, federation)
            (spec, opts), = resolve_methods(["loss_weighted"], method_options)
            gaps, ratios = [], []
            for repeat in range(config.repeats):
                sites = prepare_repeat(federation, config, repeat)
                train, _ = ScaledViews(sites, config.scaling)(tuple(range(len(sites))))
                run = plan.federated(spec, opts, train, plan.initial(federation, repeat), KeyedRng(0, (repeat,)))
                n = np.array([d.n for d in train], dtype=float)
                for r in run.history:
                    w = np.array([r.report["loss_weighted"][d.name] for d in train])
                    per_example = w / (n / n.sum())
                    gaps.append(np.abs(w - n / n.sum()).max())
                    ratios.append(per_example.max() / per_example.min())
            doc = results_document(run_experiment(config, federation))
            print(f"T={T:<5g} max|w-p| mean {np.mean(gaps):.4f} max {np.max(gaps):.4f}  max ratio {np.max(ratios):.3g}  "
                  f"ACC {_mean_metric(doc, 'LossWeighted', 'acc'):.3f} (FedAvg {_mean_metric(doc, 'FedAvg', 'acc'):.3f})  "
                  f"AUC {_mean_metric(doc, 'LossWeighted', 'auc'):.3f} (FedAvg {_mean_metric(doc, 'FedAvg', 'auc'):.3f})")


if __name__ == "__main__":
    main([float(t) for t in sys.argv[1:]] or [1.0, 0.3, 0.1, 0.05, 0.03, 0.01])
