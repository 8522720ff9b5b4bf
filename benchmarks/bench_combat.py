"""Federated ComBat speed (issue 12 §5): 10 sites x 1,000 rows x 100 features, against neuroHarmonize.

The federated run is the whole exchange (medfed.data.harmonize.federated_combat): every site's
design statistics, the coordinator's pooled fit, every site's residual statistics, the
empirical-Bayes fit, then every site adjusting its own rows; each statistic goes through wire
bytes (medfed.comm.wire) as it would deployed. neuroHarmonize's harmonizationLearn runs on the
pooled rows in the same process, on the same data (age in quarter years and sex: exact in the
float32 its design uses), and the largest difference between the two harmonized tables is
printed. Each is timed ``--repeats`` times; the median is reported.
Run: python benchmarks/bench_combat.py [--sites 10] [--rows 1000] [--features 100] [--repeats 5] [--no-eb]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time

import numpy as np

from medfed.comm.wire import decode, encode
from medfed.data.harmonize import (
    SiteRows,
    design_stats,
    fit_combat,
    fit_location,
    residual_stats,
)


def simulate(sites: int, rows: int, features: int, seed: int = 0) -> list[SiteRows]:
    rng = np.random.default_rng(seed)
    loading = rng.uniform(0.5, 2.0, features)
    out = []
    for i in range(sites):
        age = np.round(rng.normal(70, 8, rows) * 4) / 4
        sex = rng.integers(0, 2, rows).astype(float)
        X = (10 + 0.05 * age[:, None] + 0.4 * sex[:, None] + rng.normal(0, 0.5, features)
             + rng.normal(0, 1, (rows, features)) * loading * rng.uniform(0.7, 1.4))
        out.append(SiteRows(f"site{i}", X, np.column_stack([age, sex])))
    return out


def federated(rows: list[SiteRows], names: tuple[str, ...], eb: bool) -> np.ndarray:
    covariates = ("age", "sex")
    location = decode(encode(fit_location([decode(encode(design_stats(r, names, covariates))) for r in rows])))
    residuals = [decode(encode(residual_stats(r, location, names))) for r in rows]
    model = decode(encode(fit_combat(location, residuals, names, eb=eb)))
    return np.vstack([model.apply(r.name, r.X, r.C) for r in rows])


def reference(rows: list[SiteRows], eb: bool) -> np.ndarray:
    import pandas as pd
    from neuroHarmonize import harmonizationLearn

    covars = pd.DataFrame({"SITE": np.concatenate([[r.name] * len(r.X) for r in rows]),
                           "age": np.concatenate([r.C[:, 0] for r in rows]),
                           "sex": np.concatenate([r.C[:, 1] for r in rows])})
    with contextlib.redirect_stdout(io.StringIO()):
        return harmonizationLearn(np.vstack([r.X for r in rows]), covars, eb=eb)[1]


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(repeats):
        tic = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-eb", dest="eb", action="store_false")
    args = parser.parse_args()
    rows = simulate(args.sites, args.rows, args.features)
    names = tuple(f"f{j}" for j in range(args.features))
    fed_s, ours = timed(lambda: federated(rows, names, args.eb), args.repeats)
    ref_s, theirs = timed(lambda: reference(rows, args.eb), args.repeats)
    print(json.dumps({"sites": args.sites, "rows_per_site": args.rows, "features": args.features, "eb": args.eb,
                      "federated_s": round(fed_s, 4), "neuroharmonize_pooled_s": round(ref_s, 4),
                      "max_abs_difference": float(np.abs(ours - theirs).max())}, indent=2))


if __name__ == "__main__":
    main()
