"""The settings and methods of the survey's experiment (§6.3): Cross, Single, Mix (centralized,
run by the harness with the client's gradient descent), FedAvg, FedSGD and FedProx.
"""

from __future__ import annotations

import functools

from medfed.client.local import fedprox_update, fedsgd_gradient, local_sgd_update
from medfed.engine.loop import FederatedAlgorithm
from medfed.methods.method import Method
from medfed.methods.options import at_least, number
from medfed.methods.steps import SERVER_LR
from medfed.server.aggregate import apply_delta, chain, gradient_step, weighted_mean


def _fedavg(opts, training, context):
    return FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta()))


def _fedprox(opts, training, context):
    rule = functools.partial(fedprox_update, mu=opts["mu"])
    return FederatedAlgorithm("fedprox", rule, chain(weighted_mean(), apply_delta()))


def _fedsgd(opts, training, context):
    lr = opts["server_lr"] or training.lr
    return FederatedAlgorithm("fedsgd", fedsgd_gradient, chain(weighted_mean(), gradient_step(lr)))


SURVEY_EXPERIMENT: list[Method] = [
    Method(
        "cross", "Cross", "centralized",
        "train on one site, test on each other site (domain shift baseline)", "survey §6.3 (1)",
    ),
    Method(
        "single", "Single", "centralized",
        "train and test within each site separately", "survey §6.3 (2)",
    ),
    Method(
        "mix", "Mix", "centralized",
        "pool all sites' training rows (no privacy): the centralized upper bound", "survey §6.3 (3)",
    ),
    Method(
        "fedavg", "FedAvg", "federated",
        "local iterations from the global model; server averages deltas weighted by examples",
        "McMahan et al., 2017", build=_fedavg, uploads="delta",
    ),
    Method(
        "fedsgd", "FedSGD", "federated",
        "sites send gradients at the global model; server averages and steps "
        "(local_steps such exchanges per round; server_lr 0 = the training lr)",
        "McMahan et al., 2017",
        options=(SERVER_LR.but(default=0.0, range=at_least(0), help="server learning rate; 0 = the training's lr"),),
        build=_fedsgd, rounds=lambda t: t.rounds * t.local_steps, uploads="gradient",
    ),
    Method(
        "fedprox", "FedProx", "federated",
        "FedAvg with a proximal term (mu/2)||w - w_global||^2 in the local objective",
        "Li et al., 2020",
        options=(number("mu", 0.1, "FedProx proximal coefficient; (mu/2)||w - w_global||^2", range=at_least(0),
                        flag="--mu"),),
        build=_fedprox, uploads="delta",
    ),
]
