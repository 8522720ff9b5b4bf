"""A federated method made client-level differentially private (McMahan et al., 2018).

The site clips its update (:func:`medfed.comm.privacy.clip_update`, at the site's end of the
channel); the server's example-weighted mean becomes the noised fixed-denominator mean
(:func:`medfed.server.dp.dp_gaussian_mean`). Only methods whose server does nothing with the
uploads but that mean and what follows it (an update step, a server optimizer: post-processing,
which keeps the guarantee) can be made private this way; robust rules, SCAFFOLD's control
variates, q-FFL and the like read individual uploads or send more than the clipped update,
and are refused in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from medfed.comm.privacy import clip_update
from medfed.engine.protocol import FederatedAlgorithm
from medfed.errors import ConfigError
from medfed.rng import KeyedRng
from medfed.server.aggregate import replace_step
from medfed.server.dp import dp_gaussian_mean

# steps that leave the noised mean's guarantee intact: the mean itself, then post-processing
POST_PROCESSING = {"weighted_mean", "apply_delta", "gradient_step", "server_momentum", "server_adam",
                   "server_yogi", "server_adagrad"}


def client_dp(algorithm: FederatedAlgorithm, method: str, *, clip: float, noise_multiplier: float,
              sizes: Mapping[str, float], rate: float, rng: KeyedRng) -> tuple[FederatedAlgorithm, list]:
    """The private variant of ``algorithm`` and the upload transforms its sites apply (the clip)."""
    steps = [s.name for s in algorithm.aggregator.steps] or [algorithm.aggregator.name]
    other = [s for s in steps if s not in POST_PROCESSING]
    if "weighted_mean" not in steps or other:
        raise ConfigError(
            f"method {method!r} cannot run with client-level DP (--dp client): its server "
            + (f"uses {', '.join(other)}, which read individual uploads or more than the clipped update"
               if other else "has no example-weighted mean to noise")
            + "; use fedavg, fedprox, fedsgd, fedavgm, fedadam, fedyogi, fedadagrad, finetune, ditto, apfl, fedbn or fedper"
        )
    private = replace_step(algorithm.aggregator, "weighted_mean",
                           dp_gaussian_mean(noise_multiplier, clip, sizes, rate, rng))
    return dataclasses.replace(algorithm, aggregator=private), [clip_update(clip)]
