"""Utility at a privacy budget: FedAvg's test ACC and AUC at epsilon ~ 1, 3, 8 next to the
non-private run with the same training, on the embedded data (issue 10, "Measure").

For each data set and DP mode (``client``: McMahan et al., 2018, one site's whole update
protected; ``sample``: DP-SGD, one row of a site protected) the run calibrates the noise
multiplier to ``--target-epsilon E`` (every site ends at epsilon <= E at delta 1e-5, PLD
accountant) and trains exactly as the non-private baseline does otherwise (same rounds,
steps, batch, lr, seeds). Reported per setting: ACC and AUC averaged over the test sites (mean
and std over repeats of that average), the worst site's epsilon and the z chosen; a setting
whose model cannot be scored says so (never a made-up number).
Run: python benchmarks/bench_dp_utility.py [--repeats 3] [--datasets heart-disease,mni-phantom]
     [--out benchmarks/results/dp_utility.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medfed.atomic import write_bytes_atomically
from medfed.data.datasets import load_dataset
from medfed.experiments.config import build_config
from medfed.experiments.harness import run_experiment
from medfed.experiments.results import results_document

EPSILONS = (1.0, 3.0, 8.0)
# training shared by the baseline and the private runs of each data set: DP-SGD needs Poisson
# batches, so the baseline uses the same (fixed-size) batch; the CNN uses GroupNorm (DP-SGD
# refuses BatchNorm) and sample-level DP needs per-example gradients from the model
SETUPS = {
    "heart-disease": {
        "data": {"dataset": "heart-disease"},
        "training": {"rounds": 30, "local_steps": 5, "batch_size": 32, "lr": 0.1},
        "modes": {"client": {"clip": 1.0}, "sample": {"clip": 1.0}},
    },
    "mni-phantom": {
        "data": {"dataset": "mni-phantom"},
        "model": "cnn2d", "model_options": {"norm": "group"},
        "training": {"rounds": 40, "local_steps": 5, "batch_size": 32, "lr": 0.003},
        "modes": {"client": {"clip": 1.0}, "sample": {"clip": 1.0}},
    },
}


def _config(setup: dict, repeats: int, privacy: dict | None):
    values = {"data": setup["data"], "methods": ["fedavg"], "repeats": repeats, "training": setup["training"]}
    for key in ("model", "model_options"):
        if key in setup:
            values[key] = setup[key]
    if privacy:
        values["privacy"] = privacy
    return build_config(values)


def _summary(doc: dict) -> dict:
    """ACC and AUC averaged over test sites per repeat, then mean and std over repeats."""
    rows = [r for r in doc["results"] if r["setting"] == "FedAvg" and r["evaluation"] == "split"]
    out: dict = {"sites": len(rows)}
    for metric in ("acc", "auc"):
        per_site = [r["metrics"][metric]["values"] for r in rows if r["computable"]]
        if len(per_site) != len(rows) or any(v is None for vals in per_site for v in vals):
            out[metric] = None  # some site's model could not be scored: say so, no number
            continue
        per_repeat = np.mean(np.array(per_site, dtype=float), axis=0)
        out[metric] = {"mean": float(per_repeat.mean()), "std": float(per_repeat.std(ddof=1)) if len(per_repeat) > 1 else 0.0}
    out["diverged"] = sorted({d for r in rows for d in (r.get("diverged") or [])})
    privacy = doc.get("privacy") or {}
    if privacy.get("dp", "none") != "none":
        out["epsilon"] = privacy["epsilon_by_setting"].get("FedAvg")
        out["noise_multiplier"] = privacy["noise_by_setting"].get("FedAvg")
    return out


def _cell(m: dict | None) -> str:
    return "not computable" if m is None else f"{m['mean']:.3f} ± {m['std']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--datasets", default="heart-disease,mni-phantom")
    parser.add_argument("--modes", default="client,sample")
    parser.add_argument("--out", type=Path, default=None, help="write the records as JSON (and .md beside it)")
    args = parser.parse_args()
    records = []
    for name in args.datasets.split(","):
        setup = SETUPS[name]
        federation = load_dataset(name)
        runs = [("none", None, None)] + [(mode, eps, {"dp": mode, "target_epsilon": eps, "delta": 1e-5,
                                                      **setup["modes"][mode]})
                                         for mode in args.modes.split(",") for eps in EPSILONS]
        for mode, eps, privacy in runs:
            start = time.perf_counter()
            try:
                doc = results_document(run_experiment(_config(setup, args.repeats, privacy), federation))
            except Exception as exc:  # a mode this model cannot run (e.g. no per-example gradients): recorded
                records.append({"dataset": name, "dp": mode, "target_epsilon": eps, "refused": str(exc)})
                print(f"{name:14s} {mode:7s} eps<={eps}: refused: {exc}", flush=True)
                continue
            record = {"dataset": name, "dp": mode, "target_epsilon": eps, **_summary(doc),
                      "seconds": round(time.perf_counter() - start, 2)}
            records.append(record)
            print(f"{name:14s} {mode:7s} eps<={eps}: ACC {_cell(record['acc'])}  AUC {_cell(record['auc'])}"
                  f"  z={record.get('noise_multiplier')}  ({record['seconds']} s)", flush=True)
    lines = ["| data | DP | target ε | ε (worst site) | z | ACC | AUC |", "|---|---|---|---|---|---|---|"]
    for r in records:
        if "refused" in r:
            lines.append(f"| {r['dataset']} | {r['dp']} | {r['target_epsilon']:g} | refused: {r['refused']} | | | |")
            continue
        eps = "—" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        worst = "—" if r.get("epsilon") is None else f"{r['epsilon']:.3g}"
        z = "—" if r.get("noise_multiplier") is None else f"{r['noise_multiplier']:.3g}"
        lines.append(f"| {r['dataset']} | {r['dp']} | {eps} | {worst} | {z} | {_cell(r['acc'])} | {_cell(r['auc'])} |")
    print("\n".join(lines))
    if args.out is not None:
        write_bytes_atomically(args.out, (json.dumps(records, indent=1) + "\n").encode())
        write_bytes_atomically(args.out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    main()
