"""``synthetic``: a SYNTHETIC federation of many small sites, for scale studies (issue 13).

No value here was measured on anyone. The federation has ``n_sites`` sites named ``site-1``
.. ``site-K``, each with ``rows`` rows of ``features`` continuous features and a binary label,
and shifts between sites that can be turned off one by one.

Generative model
----------------
Indices: site ``k``, row ``i``, feature ``j``; ``d = features``; ``sigmoid(z) = 1 / (1 + e^-z)``.

1. Shared coefficients ``β ~ N(0, I_d) · 2 / sqrt(d)`` (so ``x·β`` has variance about 4
   whatever ``d``) and intercept ``β_0 = 0``, drawn from ``default_rng(SeedSequence(seed))``.
2. Site ``k``'s effects, from ``default_rng(SeedSequence(seed, spawn_key=(k,)))`` (one
   independent stream per site, so site ``k`` is the same in a federation of 10 or 10,000):

   * covariate shift ``μ_k ~ N(0, shift² I_d)`` (scanner or population differences);
   * concept shift ``β_k = β + N(0, (concept · 2 / sqrt(d))² I_d)`` (the label's relation to
     the features differs by site);
   * label skew ``b_k ~ N(0, label_skew²)``, added to the logit (prevalence differs by site).

3. Rows, from the same stream: ``x_ki = μ_k + ε_ki`` with ``ε_ki ~ N(0, I_d)``, and
   ``y_ki ~ Bernoulli(sigmoid((x_ki - μ_k)·β_k + b_k))``: the label depends on where a row
   lies relative to its site's centre, so a covariate shift alone changes the features'
   distribution, not the Bayes rule of the centred features.

Defaults: 100 sites × 20 rows × 10 features, ``shift = 0.5``, ``concept = 0.25``,
``label_skew = 0.5``; ``shift = concept = label_skew = 0`` makes the sites IID. A site whose
rows came out of one class keeps them (with 20 rows and these defaults that is rare): the
harness reports what it can measure on such a site's test rows.
"""

from __future__ import annotations

import numpy as np

from medfed.data.datasets.options import check_float, check_int
from medfed.data.federation import MIN_SITE_SAMPLES, Federation, Site

MAX_SITES = 1_000_000


def load_synthetic(
    n_sites: int = 100,
    rows: int = 20,
    features: int = 10,
    shift: float = 0.5,
    concept: float = 0.25,
    label_skew: float = 0.5,
    seed: int = 0,
) -> Federation:
    """``n_sites`` synthetic sites drawn from the model in the module docstring."""
    n_sites = check_int("n_sites", n_sites, 1, MAX_SITES)
    rows = check_int("rows", rows, MIN_SITE_SAMPLES)
    features = check_int("features", features, 1)
    shift = check_float("shift", shift, 0.0)
    concept = check_float("concept", concept, 0.0)
    label_skew = check_float("label_skew", label_skew, 0.0)
    seed = check_int("seed", seed, 0)

    scale = 2.0 / np.sqrt(features)
    beta = np.random.default_rng(np.random.SeedSequence(seed)).normal(size=features) * scale
    sites = []
    for k in range(n_sites):
        gen = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k,)))
        draws = gen.normal(size=(rows + 2) * features + 1)  # one call: 10,000 sites load in about a second
        centre = draws[:features] * shift
        coef = beta + draws[features : 2 * features] * (concept * scale)
        offset = draws[2 * features] * label_skew
        noise = draws[2 * features + 1 :].reshape(rows, features)
        logit = noise @ coef + offset
        y = (gen.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
        sites.append(Site(name=f"site-{k + 1}", X=centre + noise, y=y))
    return Federation(
        name="synthetic",
        sites=tuple(sites),
        feature_names=tuple(f"x{j + 1}" for j in range(features)),
        description=(
            f"SYNTHETIC: {n_sites} sites x {rows} rows x {features} features (covariate shift {shift:g}, "
            f"concept shift {concept:g}, label skew {label_skew:g}, seed {seed}); not measured data"
        ),
        attribution="medfed's synthetic many-site generator (medfed.data.datasets.synthetic); no real data",
        info={"n_sites": n_sites, "rows": rows, "features": features, "shift": shift, "concept": concept,
              "label_skew": label_skew, "seed": seed},
    )
