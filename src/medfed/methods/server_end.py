"""The survey's server-end methods (§3.3) as named settings: FedAvg's client, another server.

Each is a chain of small aggregation steps from :mod:`medfed.server`; the options are the
method's hyperparameters as a config file or ``--method-option NAME.KEY=VALUE`` sets them,
declared with the steps' own (:mod:`medfed.methods.steps`) where a method wraps one step.
"""

from __future__ import annotations

import dataclasses

from medfed.client.fourier import fourier_personalize, fourier_update
from medfed.client.local import local_sgd_update
from medfed.client.reporting import ACCURACY_TASKS, with_round_report
from medfed.engine.loop import FederatedAlgorithm
from medfed.methods.method import Method, require_sgd
from medfed.methods.options import Option, at_least, number, per_site
from medfed.methods.steps import BETA1, BETA2, F, SERVER_LR, STEPS, TAU, fourier_order
from medfed.server import optimizers, robust, weighting
from medfed.server.aggregate import apply_delta, chain, weighted_mean
from medfed.server.fourier import fourier, fourier_message
from medfed.server.fusion import dynamic_fusion

FAMILY = "survey §3.3"


def _fedavg_client(name, *steps):
    return FederatedAlgorithm(name, local_sgd_update, chain(*steps, apply_delta()))


def _spec(name, display, summary, reference, options: tuple[Option, ...], make):
    def build(opts, training, context):
        return _fedavg_client(name, *make(opts, training, context))

    return Method(name, display, "federated", summary, reference, options, build, uploads="delta", family=FAMILY)


def _step(step: str, *names: str) -> tuple[Option, ...]:
    """The options of server step ``step`` that the method exposes, as the step declares them."""
    return tuple(STEPS[step].option(n) for n in names)


BYZANTINE = F.but(flag="--byzantine")


def _fair(opts, training, context):
    require_sgd("fair", context, "q-FFL reads the local update as lr times the gradient, L = 1/lr")
    return [weighting.fair(q=opts["q"], lr=training.lr, weighting=opts["weighting"])]


def _dynamic_fusion(opts, training, context):
    """Dynamic fusion (Zhang et al., 2021b): FedAvg over the sites that met the round's deadline
    and whose local model's training accuracy reaches the bar: at 0.5 (binary), at the argmax
    (multiclass), per label at 0.5 and averaged (multilabel). Regression and segmentation are
    refused at build time: a value or a mask has no accuracy for the bar to read."""
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
        broadcast=lambda state: fourier_message(state["fourier"]), personalize=fourier_personalize,
    )


SERVER_METHODS: list[Method] = [
    _spec(
        "weighted_mean", "WeightedMean", "example-weighted mean of the sites' deltas (FedAvg's server)",
        "McMahan et al., 2017", (), lambda o, t, c: [weighted_mean()],
    ),
    _spec(
        "loss_weighted", "LossWeighted",
        "sites with a worse training loss at the global model get a smaller weight (n_k exp(-loss_k / T))",
        "Li et al., 2022", _step("loss_weighted", "temperature"),
        lambda o, t, c: [weighting.loss_weighted(temperature=o["temperature"])],
    ),
    Method(
        "fourier", "PFA", "federated",
        "Progressive Fourier Aggregation: the low spatial frequencies (DCT) of convolution kernels are "
        "averaged, a share of each axis growing from start to end over the rounds; each site keeps its own "
        "high frequencies (never uploaded) and is scored with its personal model. Models without kernels "
        "(the numpy logistic): FedAvg exactly",
        "Chen et al., 2021 (MICCAI; the survey's Chen et al., 2022)", _step("fourier", "start", "end"), _fourier,
        uploads="delta", personal=True, global_model=False, family=FAMILY, check=fourier_order,
    ),
    _spec(
        "fair", "q-FFL",
        "q-fair aggregation: sites where the global model does worse weigh more (q = 0: FedAvg)",
        "Li et al., 2020 (q-FFL); Hosseini et al., 2023",
        (STEPS["fair"].option("q").but(flag="--q"), STEPS["fair"].option("weighting")), _fair,
    ),
    dataclasses.replace(_spec(
        "guided", "Guided",
        "apply a component of the averaged delta only where the sites' deltas agree with its sign "
        "(agreement: weighted share of sites that must not oppose; 0 = FedAvg). rule=positive, the "
        "survey's literal reading (positive part only), can never learn a negative parameter",
        "Fan et al., 2021", _step("guided", "rule", "agreement"),
        lambda o, t, c: [weighting.guided(rule=o["rule"], agreement=o["agreement"])],
    ), caveat=_guided_caveat),
    _spec(
        "fedavgm", "FedAvgM", "server SGD with momentum on the averaged delta",
        "Hsu et al., 2019", (SERVER_LR, STEPS["server_momentum"].option("momentum").but(default=0.9)),
        lambda o, t, c: [weighted_mean(), optimizers.server_momentum(lr=o["server_lr"], momentum=o["momentum"])],
    ),
    _spec(
        "fedadam", "FedAdam", "server Adam on the averaged delta",
        "Reddi et al., 2021", (SERVER_LR.but(default=0.1), BETA1, BETA2, TAU),
        lambda o, t, c: [weighted_mean(), optimizers.server_adam(
            lr=o["server_lr"], beta1=o["beta1"], beta2=o["beta2"], tau=o["tau"])],
    ),
    _spec(
        "fedyogi", "FedYogi", "server Yogi (additive second moment) on the averaged delta",
        "Reddi et al., 2021", (SERVER_LR.but(default=0.01), BETA1, BETA2, TAU.but(default=1e-3)),
        lambda o, t, c: [weighted_mean(), optimizers.server_yogi(
            lr=o["server_lr"], beta1=o["beta1"], beta2=o["beta2"], tau=o["tau"])],
    ),
    _spec(
        "fedadagrad", "FedAdagrad", "server Adagrad on the averaged delta",
        "Reddi et al., 2021", (SERVER_LR.but(default=0.1), TAU),
        lambda o, t, c: [weighted_mean(), optimizers.server_adagrad(lr=o["server_lr"], tau=o["tau"])],
    ),
    _spec(
        "median", "Median", "coordinate-wise median of the deltas (Byzantine-robust)",
        "Yin et al., 2018", (), lambda o, t, c: [robust.median()],
    ),
    _spec(
        "trimmed_mean", "TrimmedMean", "coordinate-wise mean after dropping the beta fraction at each end",
        "Yin et al., 2018", (STEPS["trimmed_mean"].option("beta").but(flag="--trim-beta"),),
        lambda o, t, c: [robust.trimmed_mean(beta=o["beta"])],
    ),
    _spec(
        "krum", "Krum", "the delta closest to its K - f - 2 nearest others",
        "Blanchard et al., 2017", (BYZANTINE,), lambda o, t, c: [robust.krum(f=o["f"])],
    ),
    _spec(
        "multikrum", "MultiKrum", "example-weighted mean of the m best-scored deltas by Krum (m = 0: K - f)",
        "Blanchard et al., 2017", (BYZANTINE, STEPS["multikrum"].option("m")),
        lambda o, t, c: [robust.multikrum(f=o["f"], m=o["m"])],
    ),
    _spec(
        "bulyan", "Bulyan", "Krum-selected K - 2f deltas, then a coordinate-wise trimmed mean around the median",
        "El Mhamdi et al., 2018", (BYZANTINE,), lambda o, t, c: [robust.bulyan(f=o["f"])],
    ),
    _spec(
        "dos", "DOS", "distance-based outlier suppression: COPOD scores on update distances, softmax(-score) weights",
        "Alkhunaizi et al., 2022", _step("dos", "temperature"), lambda o, t, c: [robust.dos(temperature=o["temperature"])],
    ),
    Method(
        "dynamic_fusion", "DynamicFusion", "federated",
        "drop sites that miss the round deadline or whose local accuracy is below the bar",
        "Zhang et al., 2021b",
        (
            STEPS["dynamic_fusion"].option("deadline").but(default=1.5),
            STEPS["dynamic_fusion"].option("bar").but(default=0.5),
            number("latency", 1.0, "simulated mean seconds a site takes per round", range=at_least(0)),
            number("jitter", 0.5, "spread of the simulated log-normal latency (0 = always the mean)",
                   range=at_least(0)),
            per_site("latencies", "simulated mean seconds per site (others: latency)", range=at_least(0)),
        ),
        _dynamic_fusion, uploads="delta", family=FAMILY,
        tasks=ACCURACY_TASKS,  # its bar is on each site's training accuracy (client/reporting.py)
    ),
]

