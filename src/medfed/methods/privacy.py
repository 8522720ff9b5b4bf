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
import math
from collections.abc import Mapping

import numpy as np

from medfed.client.upload import Upload
from medfed.comm.privacy import clip_update
from medfed.comm.secure import ROUND_CLIP, SiteSecure, site_noise_std
from medfed.engine.protocol import FederatedAlgorithm
from medfed.engine.secure import SecureSettings
from medfed.errors import ConfigError
from medfed.rng import KeyedRng
from medfed.server.aggregate import needs_uploads, replace_step
from medfed.server.dp import dp_adaptive_mean, dp_gaussian_mean

# steps that leave the noised mean's guarantee intact: the mean itself, then post-processing
CLIP_MESSAGE = ROUND_CLIP  # the round's clip bound, sent down with the global model (adaptive clipping)
POST_PROCESSING = {"weighted_mean", "apply_delta", "gradient_step", "server_momentum", "server_adam",
                   "server_yogi", "server_adagrad"}


def client_dp(algorithm: FederatedAlgorithm, method: str, *, clip: float, noise_multiplier: float,
              sizes: Mapping[str, float], rate: float, rng: KeyedRng,
              adaptive: bool = False, site_noise: float = 0.0, mode: str = "client") -> FederatedAlgorithm:
    """The private variant of ``algorithm``: both halves, the site's clip
    (:func:`client_dp_site`) and the server's noised mean. ``--dp distributed`` is this with
    ``noise_multiplier = 0`` at the server and ``site_noise`` (:func:`medfed.comm.secure.site_noise_std`)
    added by each site before masking (:func:`secure_sides`)."""
    steps = [s.name for s in algorithm.aggregator.steps] or [algorithm.aggregator.name]
    other = [s for s in steps if s not in POST_PROCESSING]
    if "weighted_mean" not in steps or other:
        raise ConfigError(
            f"method {method!r} cannot run with client-level DP (--dp {mode}): its server "
            + (f"uses {', '.join(other)}, which read individual uploads or more than the clipped update"
               if other else "has no example-weighted mean to noise")
            + "; use fedavg, fedprox, fedsgd, fedavgm, fedadam, fedyogi, fedadagrad, finetune, ditto, apfl, fedbn, fedper or multitask"
        )
    if adaptive:
        step = dp_adaptive_mean(noise_multiplier, clip, sizes, rate, rng)
        broadcast = algorithm.broadcast

        def with_clip(state):
            return {**(broadcast(state) if broadcast else {}), CLIP_MESSAGE: state["dp_adaptive_mean"].clip}

        private = dataclasses.replace(algorithm, aggregator=replace_step(algorithm.aggregator, "weighted_mean", step),
                                      broadcast=with_clip)
    else:
        step = dp_gaussian_mean(noise_multiplier, clip, sizes, rate, rng, site_noise=site_noise)
        private = dataclasses.replace(algorithm, aggregator=replace_step(algorithm.aggregator, "weighted_mean", step))
    return client_dp_site(private, clip, adaptive=adaptive)


def client_dp_site(algorithm: FederatedAlgorithm, clip: float, *, adaptive: bool = False) -> FederatedAlgorithm:
    """The site's half of client-level DP: every upload clipped before it leaves, to ``clip``
    or, with adaptive clipping, to the bound the server sent this round; then the upload also
    says whether it was within the bound (``extras["dp_within_clip"]``, 1 or 0)."""
    update = algorithm.local_update

    def local_update(*args, **message):
        bound = float(message.pop(CLIP_MESSAGE, clip))
        upload, state = update(*args, **message)
        norm = math.sqrt(sum(float(np.vdot(v, v)) for v in upload.payload.values()))
        upload = clip_update(bound)(upload)
        if adaptive:
            upload = Upload(upload.site, upload.payload, upload.n_examples, upload.kind, upload.metrics,
                            {**upload.extras, "dp_within_clip": float(norm <= bound)})
        return upload, state

    personalize = algorithm.personalize
    if personalize is None:
        return dataclasses.replace(algorithm, local_update=local_update)

    def personalize_without_clip(*args, **message):  # the bound is for the shared update only
        message.pop(CLIP_MESSAGE, None)
        return personalize(*args, **message)

    return dataclasses.replace(algorithm, local_update=local_update, personalize=personalize_without_clip)


def check_secure(algorithm: FederatedAlgorithm, method: str) -> None:
    """Refuse, in one line, a method whose server reads individual uploads: under secure
    aggregation it receives only their sum."""
    steps = needs_uploads(algorithm.aggregator)
    if steps:
        raise ConfigError(
            f"method {method!r} cannot run with --secure-aggregation: its server step(s) {', '.join(steps)} read "
            "individual uploads, and the server receives only their sum; use fedavg, fedprox, fedsgd, fedavgm, "
            "fedadam, fedyogi, fedadagrad, scaffold, finetune, ditto, apfl, fedbn, fedper or multitask"
        )


def secure_sides(algorithm: FederatedAlgorithm, method: str, *, clip: float, sizes: Mapping[str, float],
                 min_sites: int, threshold: int | None = None, degree: int | None = None,
                 distributed_noise: float = 0.0, bits: int = 0) -> tuple[SiteSecure, SecureSettings]:
    """Each side's secure aggregation for ``algorithm`` (refused by :func:`check_secure` first):
    the site's noise under ``--dp distributed`` (noise multiplier ``distributed_noise``) sized for
    the fewest sites a round accepts, ``m = max(min_sites, 2)``, the bits both sides quantize to
    in the ring (``--compress q8|q4``; 0: none), and the server's settings."""
    check_secure(algorithm, method)
    fewest = max(int(min_sites), 2)
    noise = site_noise_std(distributed_noise, clip, sizes, fewest)
    return SiteSecure(noise, bits), SecureSettings(float(sum(sizes.values())), float(clip), fewest, threshold, degree,
                                                   noise, bits)


def check_sample_dp(algorithm: FederatedAlgorithm, method: str, model, batch_size: int | None) -> None:
    """Refuse, in one line, what DP-SGD inside local training cannot make private yet: a site
    rule with its own optimizer terms (control variates, personal models trained by another
    loop), a model without per-example gradients or with BatchNorm (per-example gradients are
    not defined across a batch, and its running statistics would carry the rows unnoised),
    full batches."""
    from medfed.client.local import fedprox_update, local_sgd_update

    rule = getattr(algorithm.local_update, "func", algorithm.local_update)
    if rule not in (local_sgd_update, fedprox_update):
        raise ConfigError(f"method {method!r} cannot run with DP-SGD (--dp sample) yet: its sites train with their "
                          "own optimizer terms; use fedavg, fedprox, finetune or a server-end method "
                          "(fedavgm, fedadam, median, krum, ...)")
    if not hasattr(model, "per_example_gradients"):
        raise ConfigError(f"--dp sample needs per-example gradients; model {getattr(model, 'name', model)!r} has none "
                          "(logistic, torch_logistic, mlp, cnn2d and cnn3d have them)")
    if getattr(model, "options", {}).get("norm") == "batch":
        raise ConfigError(f"--dp sample cannot train model {model.name!r} with BatchNorm (its batch statistics tie "
                          "each row's gradient to the other rows'): use GroupNorm, --model-option norm=group")
    if batch_size is None:
        raise ConfigError("--dp sample draws Poisson batches: give --batch-size B (the expected batch)")
