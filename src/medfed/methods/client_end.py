"""The survey's client-end methods (§3.2) as named settings.

Each spec builds a client rule from :mod:`medfed.client.drift` or
:mod:`medfed.client.personal` and its server chain; options are the method's
hyperparameters as a config file (``[method_options.NAME]``) or
``--method-option NAME.KEY=VALUE`` sets them. A 0 for a step count or learning rate means
"the training's own value" (``local_steps``, ``lr``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from medfed.client.drift import (
    check_speeds,
    fedsld_update,
    scaffold_update,
    semisync_update,
)
from medfed.client.local import local_sgd_update
from medfed.client.personal import (
    apfl_personalize,
    apfl_update,
    ditto_personalize,
    ditto_update,
    finetune_personalize,
)
from medfed.engine.loop import FederatedAlgorithm
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec
from medfed.experiments.spec import BuildContext, MethodSpec, check_number, require_sgd
from medfed.server.aggregate import apply_delta, chain, weighted_mean
from medfed.server.control import (
    SCAFFOLD_WEIGHTINGS,
    federation_label_prior,
    label_distribution,
    scaffold_control,
    site_mean,
    time_budget,
)

FAMILY = "survey §3.2"


def _with_defaults(method: str, defaults: Mapping[str, Any], opts: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(opts) - set(defaults)
    if unknown:
        raise ConfigError(
            f"method {method!r} has no option {min(unknown)!r}; its options: {', '.join(defaults) or 'none'}"
        )
    return {**defaults, **opts}


def _fedavg_server():
    return chain(weighted_mean(), apply_delta())


def _scaffold(opts, training: TrainingSpec, context: BuildContext) -> FederatedAlgorithm:
    """SCAFFOLD (Karimireddy et al., 2020). Departs from the paper by default: the server weighs
    sites by examples in its average and in ``c`` (``weighting="examples"``), so the method
    converges to the federation's objective, the one every other setting and the reported
    loss use; ``weighting="uniform"`` is the paper's equal weighting."""
    server_lr = check_number("scaffold", "server_lr", opts["server_lr"], low=0.0, low_open=True)
    weighting = opts["weighting"]
    if weighting not in SCAFFOLD_WEIGHTINGS:
        raise ConfigError(
            f"method 'scaffold' option 'weighting' must be one of {', '.join(SCAFFOLD_WEIGHTINGS)}, got {weighting!r}"
        )
    if not context.site_names:
        raise ConfigError("method 'scaffold' needs the training sites' names (N in the control update)")
    require_sgd("scaffold", context, "its control variates read (x - y) / (K lr) as the mean local gradient")
    if weighting == "examples":
        weights, average = context.site_sizes, weighted_mean()  # unknown sizes are learnt from the uploads
    else:
        weights, average = {site: 1.0 for site in context.site_names}, site_mean()
    aggregator = chain(scaffold_control(weights, weighting), average, apply_delta(server_lr))
    return FederatedAlgorithm(
        "scaffold", scaffold_update, aggregator, broadcast=lambda state: {"server_control": state[0].control}
    )


def _fedsld(opts, training: TrainingSpec, context: BuildContext) -> FederatedAlgorithm:
    aggregator = chain(label_distribution(context.label_counts), weighted_mean(), apply_delta())
    return FederatedAlgorithm(
        "fedsld", fedsld_update, aggregator, broadcast=lambda state: {"label_prior": federation_label_prior(state[0])}
    )


def _semisync(opts, training: TrainingSpec, context: BuildContext) -> FederatedAlgorithm:
    speeds = check_speeds(opts["speeds"], context.site_names)
    budget = check_number("semisync", "budget", opts["budget"], low=0.0)
    rule = functools.partial(semisync_update, speeds=speeds)
    aggregator = chain(time_budget(budget), weighted_mean(), apply_delta())
    return FederatedAlgorithm("semisync", rule, aggregator, broadcast=lambda state: {"budget": state[0][0]})


def _finetune(opts, training: TrainingSpec, context: BuildContext) -> FederatedAlgorithm:
    steps = check_number("finetune", "finetune_steps", opts["finetune_steps"], low=0, whole=True)
    lr = check_number("finetune", "finetune_lr", opts["finetune_lr"], low=0.0)
    personalize = functools.partial(finetune_personalize, steps=steps or None, lr=lr or None)
    return FederatedAlgorithm("finetune", local_sgd_update, _fedavg_server(), personalize=personalize)


def _apfl(opts, training: TrainingSpec, context: BuildContext) -> FederatedAlgorithm:
    alpha = check_number("apfl", "alpha", opts["alpha"], low=0.0, high=1.0)
    return FederatedAlgorithm(
        "apfl",
        functools.partial(apfl_update, alpha=alpha),
        _fedavg_server(),
        personalize=functools.partial(apfl_personalize, alpha=alpha),
    )


def _ditto(opts, training: TrainingSpec, context: BuildContext) -> FederatedAlgorithm:
    lam = check_number("ditto", "lam", opts["lam"], low=0.0)
    steps = check_number("ditto", "personal_steps", opts["personal_steps"], low=0, whole=True) or None
    return FederatedAlgorithm(
        "ditto",
        functools.partial(ditto_update, lam=lam, personal_steps=steps),
        _fedavg_server(),
        personalize=functools.partial(ditto_personalize, lam=lam, personal_steps=steps),
    )


def _spec(name, display, summary, reference, defaults, make, *, personal=False, flags=()) -> MethodSpec:
    def build(opts, training, context):
        return make(_with_defaults(name, defaults, opts), training, context)

    return MethodSpec(
        name, display, "federated", summary, reference, defaults, build,
        uploads="delta", personal=personal, family=FAMILY, flags=flags,
    )


CLIENT_METHODS: list[MethodSpec] = [
    _spec(
        "scaffold", "SCAFFOLD",
        "control variates correct each local gradient for the site's drift (option II; plain SGD steps); "
        "weighting: examples (the federation's objective) or uniform (the paper: sites weigh equally)",
        "Karimireddy et al., 2020", {"server_lr": 1.0, "weighting": "examples"}, _scaffold, flags=("server_lr",),
    ),
    _spec(
        "fedsld", "FedSLD",
        "cross-entropy reweighted by each batch's label distribution relative to the federation's "
        "(label counts leave the sites)",
        "Luo & Wu, 2022", {}, _fedsld,
    ),
    _spec(
        "semisync", "SemiSync",
        "each site runs as many local steps as fit a shared time budget, by its speed (examples/s) "
        "and rows per step (budget 0 = the slowest site's time for local_steps)",
        "Stripelis et al., 2021", {"speeds": {}, "budget": 0.0}, _semisync,
    ),
    _spec(
        "finetune", "FineTune",
        "FedAvg, then each site fine-tunes the final global model on its training rows "
        "(finetune_steps/finetune_lr 0 = the training's)",
        "Wicaksana et al., 2022a; Tan et al., 2022", {"finetune_steps": 0, "finetune_lr": 0.0}, _finetune,
        personal=True,
    ),
    _spec(
        "apfl", "APFL",
        "each site keeps a local model; its personal model mixes it with the global one (alpha: local weight)",
        "Deng et al., 2020; Jiang et al., 2023", {"alpha": 0.5}, _apfl, personal=True, flags=("alpha",),
    ),
    _spec(
        "ditto", "Ditto",
        "FedAvg plus a personal model per site with a proximal pull (lam/2)||v - w||^2 toward the global "
        "(personal_steps 0 = local_steps)",
        "Li et al., 2021; T Dinh et al., 2020", {"lam": 0.1, "personal_steps": 0}, _ditto,
        personal=True, flags=("lam",),
    ),
]
