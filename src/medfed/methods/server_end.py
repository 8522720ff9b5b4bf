"""The survey's server-end methods (§3.3) as named settings: FedAvg's client, another server.

Each is a chain of small aggregation steps from :mod:`medfed.server`; the options are the
method's hyperparameters as a config file or ``--method-option NAME.KEY=VALUE`` sets them.
"""

from __future__ import annotations

import dataclasses

from medfed.client.fourier import fourier_personalize, fourier_update
from medfed.client.local import local_sgd_update
from medfed.client.reporting import with_round_report
from medfed.engine.loop import FederatedAlgorithm
from medfed.experiments.spec import MethodSpec, require_sgd
from medfed.server import optimizers, robust, weighting
from medfed.server.aggregate import apply_delta, chain, weighted_mean
from medfed.server.fourier import fourier, fourier_message
from medfed.server.fusion import dynamic_fusion

FAMILY = "survey §3.3"


def _fedavg_client(name, *steps):
    return FederatedAlgorithm(name, local_sgd_update, chain(*steps, apply_delta()))


def _spec(name, display, summary, reference, defaults, make, flags=()):
    def build(opts, training, context):
        return _fedavg_client(name, *make(opts, training, context))

    return MethodSpec(
        name, display, "federated", summary, reference, defaults, build, uploads="delta", family=FAMILY, flags=flags
    )


def _fair(opts, training, context):
    require_sgd("fair", context, "q-FFL reads the local update as lr times the gradient, L = 1/lr")
    return [weighting.fair(q=opts["q"], lr=training.lr, weighting=opts["weighting"])]


def _dynamic_fusion(opts, training, context):
    rule = with_round_report(local_sgd_update, opts["latencies"], opts["jitter"], opts["latency"])
    aggregator = chain(dynamic_fusion(opts["deadline"], opts["bar"]), apply_delta())
    return FederatedAlgorithm("dynamic_fusion", rule, aggregator)


def _guided_caveat(opts) -> str | None:
    if opts.get("rule") == "positive":
        return ("guided rule=positive applies only the positive part of the averaged delta: every parameter "
                "can only grow from its initial value, so a coefficient that should be negative is never "
                "learned (a logistic model started at 0 can score at or below chance)")
    return None


def _fourier(opts, training, context):
    """PFA (Chen et al., MICCAI 2021): :mod:`medfed.client.fourier` at the sites,
    :func:`medfed.server.fourier.fourier` at the server, over the training's rounds.

    Departures from the paper and the authors' code (PRR-FL): DET, the deputy model and its
    Recover-Exchange-Sublimate transfer, is out of scope (each site trains its personal model
    directly, FedAvg's local steps); the transform is an orthonormal DCT over each kernel's
    spatial axes, where the code runs a 2-D FFT over the kernel tensor reshaped to
    (in·height, width·out) and averages only the amplitudes, keeping each site's phase;
    averaging the coefficients themselves keeps the step linear (full share = FedAvg) and
    never mixes channels into "frequency". Dense layers are averaged whole (the code also
    filters fully connected weights), normalization layers too (the code keeps BN local);
    sites weigh by examples, not 1/K; and sites upload only their low frequencies, where the
    code uploads whole models and splits them at the server.
    """
    aggregator = chain(fourier(start=opts["start"], end=opts["end"], rounds=training.rounds), apply_delta())
    return FederatedAlgorithm(
        "fourier", fourier_update, aggregator,
        broadcast=lambda state: fourier_message(state[0]), personalize=fourier_personalize,
    )


SERVER_METHODS: list[MethodSpec] = [
    _spec(
        "weighted_mean", "WeightedMean", "example-weighted mean of the sites' deltas (FedAvg's server)",
        "McMahan et al., 2017", {}, lambda o, t, c: [weighted_mean()],
    ),
    _spec(
        "loss_weighted", "LossWeighted",
        "sites with a worse training loss at the global model get a smaller weight (n_k exp(-loss_k / T))",
        "Li et al., 2022", {"temperature": weighting.LOSS_WEIGHTED_TEMPERATURE},
        lambda o, t, c: [weighting.loss_weighted(temperature=o["temperature"])],
    ),
    MethodSpec(
        "fourier", "PFA", "federated",
        "Progressive Fourier Aggregation: the low spatial frequencies (DCT) of convolution kernels are "
        "averaged, a share of each axis growing from start to end over the rounds; each site keeps its own "
        "high frequencies (never uploaded) and is scored with its personal model. Models without kernels "
        "(the numpy logistic): FedAvg exactly",
        "Chen et al., 2021 (MICCAI; the survey's Chen et al., 2022)", {"start": 0.7, "end": 0.95}, _fourier,
        uploads="delta", personal=True, global_model=False, family=FAMILY,
    ),
    _spec(
        "fair", "q-FFL",
        "q-fair aggregation: sites where the global model does worse weigh more (q = 0: FedAvg)",
        "Li et al., 2020 (q-FFL); Hosseini et al., 2023", {"q": 1.0, "weighting": "examples"},
        _fair, flags=("q",),
    ),
    dataclasses.replace(_spec(
        "guided", "Guided",
        "apply a component of the averaged delta only where the sites' deltas agree with its sign "
        "(agreement: weighted share of sites that must not oppose; 0 = FedAvg). rule=positive, the "
        "survey's literal reading (positive part only), can never learn a negative parameter",
        "Fan et al., 2021", {"rule": "agreement", "agreement": 1.0},
        lambda o, t, c: [weighting.guided(rule=o["rule"], agreement=o["agreement"])],
    ), caveat=_guided_caveat),
    _spec(
        "fedavgm", "FedAvgM", "server SGD with momentum on the averaged delta",
        "Hsu et al., 2019", {"server_lr": 1.0, "momentum": 0.9},
        lambda o, t, c: [weighted_mean(), optimizers.server_momentum(lr=o["server_lr"], momentum=o["momentum"])],
        flags=("server_lr",),
    ),
    _spec(
        "fedadam", "FedAdam", "server Adam on the averaged delta",
        "Reddi et al., 2021", {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-9},
        lambda o, t, c: [weighted_mean(), optimizers.server_adam(
            lr=o["server_lr"], beta1=o["beta1"], beta2=o["beta2"], tau=o["tau"])],
        flags=("server_lr",),
    ),
    _spec(
        "fedyogi", "FedYogi", "server Yogi (additive second moment) on the averaged delta",
        "Reddi et al., 2021", {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
        lambda o, t, c: [weighted_mean(), optimizers.server_yogi(
            lr=o["server_lr"], beta1=o["beta1"], beta2=o["beta2"], tau=o["tau"])],
        flags=("server_lr",),
    ),
    _spec(
        "fedadagrad", "FedAdagrad", "server Adagrad on the averaged delta",
        "Reddi et al., 2021", {"server_lr": 0.1, "tau": 1e-9},
        lambda o, t, c: [weighted_mean(), optimizers.server_adagrad(lr=o["server_lr"], tau=o["tau"])],
        flags=("server_lr",),
    ),
    _spec(
        "median", "Median", "coordinate-wise median of the deltas (Byzantine-robust)",
        "Yin et al., 2018", {}, lambda o, t, c: [robust.median()],
    ),
    _spec(
        "trimmed_mean", "TrimmedMean", "coordinate-wise mean after dropping the beta fraction at each end",
        "Yin et al., 2018", {"beta": 0.1}, lambda o, t, c: [robust.trimmed_mean(beta=o["beta"])], flags=("beta",),
    ),
    _spec(
        "krum", "Krum", "the delta closest to its K - f - 2 nearest others",
        "Blanchard et al., 2017", {"f": 1}, lambda o, t, c: [robust.krum(f=o["f"])], flags=("f",),
    ),
    _spec(
        "multikrum", "MultiKrum", "example-weighted mean of the m best-scored deltas by Krum (m = 0: K - f)",
        "Blanchard et al., 2017", {"f": 1, "m": 0}, lambda o, t, c: [robust.multikrum(f=o["f"], m=o["m"])],
        flags=("f",),
    ),
    _spec(
        "bulyan", "Bulyan", "Krum-selected K - 2f deltas, then a coordinate-wise trimmed mean around the median",
        "El Mhamdi et al., 2018", {"f": 1}, lambda o, t, c: [robust.bulyan(f=o["f"])], flags=("f",),
    ),
    _spec(
        "dos", "DOS", "distance-based outlier suppression: COPOD scores on update distances, softmax(-score) weights",
        "Alkhunaizi et al., 2022", {"temperature": 1.0}, lambda o, t, c: [robust.dos(temperature=o["temperature"])],
    ),
    MethodSpec(
        "dynamic_fusion", "DynamicFusion", "federated",
        "drop sites that miss the round deadline or whose local accuracy is below the bar",
        "Zhang et al., 2021b",
        {"deadline": 1.5, "bar": 0.5, "latency": 1.0, "jitter": 0.5, "latencies": {}},
        _dynamic_fusion, uploads="delta", family=FAMILY,
    ),
]

