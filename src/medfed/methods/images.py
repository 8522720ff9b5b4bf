"""Partial-sharing methods for image models (survey §3.2) as named settings: FedBN and FedPer.

Both run FedAvg's client (:func:`medfed.client.local.local_sgd_update`) wrapped by
:func:`medfed.client.sharing.keep_private` and FedAvg's server; the engine's sharing policy
keeps the private names out of every upload. Which parameters are private is decided from
their names alone (the convention of :mod:`medfed.models.registry`), since a method is built
before the model is known. Each site ends with a personal model: the global shared
parameters with its own private ones. The global model alone keeps the private parts at
their initial values, so only the personal models are meaningful to evaluate.

Importing this module does not load torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medfed.client.local import local_sgd_update
from medfed.client.sharing import keep_private, personalize_private
from medfed.engine.loop import FederatedAlgorithm
from medfed.methods.method import BuildContext, Method, Training
from medfed.methods.options import boolean, choice
from medfed.models.registry import is_decoder, is_head, is_norm, is_norm_statistic
from medfed.server.aggregate import apply_delta, chain, weighted_mean

FAMILY = "survey §3.2"


def fedbn(local_affine: bool = True) -> FederatedAlgorithm:
    """FedBN (Li et al., 2021) / SiloBN (Andreux et al., 2020): normalization stays at each site.

    ``local_affine=True`` (FedBN): every normalization parameter (running statistics and the
    affine weight/bias) is private; ``False`` (SiloBN): only the running statistics are, the
    affine terms are averaged with the rest. Everything else is FedAvg.
    """
    private = is_norm if local_affine else is_norm_statistic
    name = "fedbn" if local_affine else "silobn"
    return FederatedAlgorithm(
        "fedbn",
        keep_private(local_sgd_update, private, method=name),
        chain(weighted_mean(), apply_delta()),
        personalize=personalize_private,
        private=private,
    )


PRIVATE_PARTS = {"head": is_head, "decoder": is_decoder}


def fedper(private: str = "head", name: str = "fedper") -> FederatedAlgorithm:
    """FedPer (Arivazhagan et al., 2019; in the survey, Feng et al., 2022 and Chakravarty et
    al., 2021): each site keeps its own head (the final layer); the body is averaged as in FedAvg.

    ``private="decoder"``: a U-Net's whole decoder (its up blocks and the head) stays at each site
    and only the encoder is averaged, as Feng et al. (2022, FedMRI) share the encoder and keep
    site-specific decoders; FedMRI's weighted contrastive term on the shared latent is left out.
    ``name`` is the method's name in the algorithm and its errors (``multitask`` runs this machinery).
    """
    is_private = PRIVATE_PARTS[private]
    return FederatedAlgorithm(
        name,
        keep_private(local_sgd_update, is_private, method=name),
        chain(weighted_mean(), apply_delta()),
        personalize=personalize_private,
        private=is_private,
    )


def _build_fedbn(opts: Mapping[str, Any], training: Training, context: BuildContext) -> FederatedAlgorithm:
    return fedbn(opts["local_affine"])


def _build_fedper(opts: Mapping[str, Any], training: Training, context: BuildContext) -> FederatedAlgorithm:
    return fedper(opts["private"])


IMAGE_METHODS: list[Method] = [
    Method(
        "fedbn", "FedBN", "federated",
        "normalization layers stay at each site (running statistics, and with local_affine their "
        "weight/bias; local_affine=false is SiloBN); the rest is FedAvg. Needs a model with norm layers",
        "Li et al., 2021; Andreux et al., 2020",
        options=(boolean("local_affine", True, "keep the norm layers' weight/bias private too (false: SiloBN)"),),
        build=_build_fedbn,
        uploads="delta", personal=True, global_model=False, family=FAMILY,
    ),
    Method(
        "fedper", "FedPer", "federated",
        "each site keeps its own head (final layer) private; the body is averaged as in FedAvg",
        "Arivazhagan et al., 2019; Feng et al., 2022; Chakravarty et al., 2021", build=_build_fedper,
        options=(choice("private", "head", tuple(PRIVATE_PARTS),
                        "what stays at each site: the head, or a U-Net's decoder (up blocks and head; Feng et al., 2022)"),),
        uploads="delta", personal=True, global_model=False, family=FAMILY,
    ),
]
