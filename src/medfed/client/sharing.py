"""Partial sharing at the client end (survey §3.2): some parameters never leave the site.

:func:`keep_private` turns any local update rule into one that keeps the parameters a
predicate names at the site: FedBN's normalization layers (Li et al., 2021; SiloBN,
Andreux et al., 2020), FedPer's head (Arivazhagan et al., 2019). The site trains its own
private parameters together with the global shared ones, uploads only the shared ones, and
its personal model is the global shared parameters with its private ones
(:func:`personalize_private`).

The engine's sharing policy (:func:`medfed.comm.policy.sharing_policy`) refuses, at the
upload boundary, any upload that names a private parameter; this wrapper is what makes the
rule's uploads pass it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from medfed.client.local import LocalData, LocalTraining
from medfed.client.upload import Upload
from medfed.errors import ConfigError
from medfed.models.logistic import Params
from medfed.rng import KeyedRng
from medfed.wiretypes import wire_type


@wire_type
@dataclasses.dataclass(frozen=True)
class PrivateState:
    """A site's client state under partial sharing: the wrapped rule's own state and the
    site's private parameters (neither ever leaves the site)."""

    inner: Any
    private: dict[str, np.ndarray]


def _copy(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float64, copy=True) for k, v in params.items()}


def check_split(method: str, model_name: str, names, private) -> None:
    """Refuse a model whose parameters ``names`` leave nothing private (``private``: those the
    method keeps) or nothing to share; called at build time and again by the site rule."""
    if not private:
        raise ConfigError(
            f"{method}: model {model_name!r} has no parameter this method keeps private "
            f"(its parameters: {', '.join(names)}); choose a model that has them (e.g. cnn2d with norm=batch)"
        )
    if len(private) == len(names):
        raise ConfigError(f"{method}: every parameter of model {model_name!r} would stay private; nothing is left to share")


def _refuse_private_extras(method: str, extras: Mapping, is_private: Callable[[str], bool]) -> None:
    """Extras shaped like the parameter view (e.g. SCAFFOLD's control deltas) would carry
    information about private parameters out of the site: refuse the combination."""
    for key, value in extras.items():
        if isinstance(value, Mapping) and any(isinstance(k, str) and is_private(k) for k in value):
            raise ConfigError(
                f"{method}: the local rule's upload extra {key!r} holds private parameters; "
                "this rule does not combine with partial sharing"
            )


def keep_private(
    rule: Callable[..., tuple[Upload, Any]],
    is_private: Callable[[str], bool],
    *,
    method: str = "partial sharing",
) -> Callable[..., tuple[Upload, PrivateState]]:
    """Wrap a local update rule so that the parameters ``is_private`` names stay at the site.

    Each round the site overlays its private parameters (its client state; the global
    model's values at its first participation) on the global model, runs ``rule`` from
    there, uploads the shared names only (the rule's delta or parameters for them) and keeps
    its trained private parameters. Rules that upload a delta or parameters qualify; a
    gradient rule (FedSGD) has no local model to keep, and a rule whose extras are shaped
    like the parameter view (SCAFFOLD) would leak private information: both are refused.
    """

    def update(
        global_params: Params,
        data: LocalData,
        config: LocalTraining,
        state: PrivateState | None,
        rng: KeyedRng,
        **message: Any,
    ) -> tuple[Upload, PrivateState]:
        inner, own = (None, None) if state is None else (state.inner, state.private)
        if own is None:
            own = _copy({k: v for k, v in global_params.items() if is_private(k)})
            check_split(method, getattr(config.model, "name", "?"), list(global_params), own)
        start = {k: own.get(k, v) for k, v in global_params.items()}
        upload, inner = rule(start, data, config, inner, rng, **message)
        if upload.kind == "gradient":
            raise ConfigError(f"{method}: the local rule uploads gradients; partial sharing needs a rule that trains locally")
        _refuse_private_extras(method, upload.extras, is_private)
        trained = dict(own)
        for k in own:
            if k in upload.payload:
                sent = np.asarray(upload.payload[k], dtype=np.float64)
                trained[k] = start[k] + sent if upload.kind == "delta" else np.array(sent, copy=True)
        shared = {k: v for k, v in upload.payload.items() if not is_private(k)}
        return dataclasses.replace(upload, payload=shared), PrivateState(inner, trained)

    update.__name__ = f"keep_private({getattr(rule, '__name__', 'rule')})"
    update.__doc__ = f"{rule.__doc__ or ''}\n\nWrapped by keep_private: private parameters stay at the site."
    return update


def personalize_private(
    global_params: Params, data: LocalData, training: LocalTraining, state: PrivateState | None, rng: KeyedRng
) -> dict[str, np.ndarray]:
    """A site's personal model under partial sharing: the global shared parameters with the
    site's own private ones (the global model itself for a site that never took part).

    A model that can (``recalibrate``) then recomputes its normalization statistics on the
    site's own rows under these final weights: the site's statistics were last taken under its
    local weights of the final round, before the server averaged the shared ones. It is a
    local computation; nothing leaves the site.
    """
    own = {} if state is None or state.private is None else state.private
    personal = {k: np.array(own.get(k, v), dtype=np.float64, copy=True) for k, v in global_params.items()}
    recalibrate = getattr(training.model, "recalibrate", None)
    return recalibrate(personal, data.X) if recalibrate is not None else personal
