"""The survey's client-end methods (§3.2) as named settings.

Each spec builds a client rule from :mod:`medfed.client.drift` or
:mod:`medfed.client.personal` and its server chain; options are the method's
hyperparameters as a config file (``[method_options.NAME]``) or
``--method-option NAME.KEY=VALUE`` sets them, declared once in each method's options and
checked before the build. A 0 for a step count or learning rate means "the training's own
value" (``local_steps``, ``lr``).
"""

from __future__ import annotations

import functools

from medfed.client.drift import (
    check_speeds,
    fedsld_update,
    scaffold_update,
    semisync_update,
)
from medfed.client.distill import distill_update
from medfed.client.local import local_sgd_update
from medfed.client.semisupervised import semisupervised_update
from medfed.client.vat import vat_update
from medfed.client.personal import (
    apfl_personalize,
    apfl_update,
    ditto_personalize,
    ditto_update,
    finetune_personalize,
)
from medfed.engine.loop import FederatedAlgorithm
from medfed.errors import ConfigError
from medfed.methods.method import BuildContext, Method, Training, require_sgd
from medfed.methods.options import Option, above, at_least, boolean, choice, closed, number, per_site, whole
from medfed.methods.steps import SERVER_LR
from medfed.models.distill import Distillation
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


def _fedavg_server():
    return chain(weighted_mean(), apply_delta())


def _scaffold(opts, training: Training, context: BuildContext) -> FederatedAlgorithm:
    """SCAFFOLD (Karimireddy et al., 2020). Departs from the paper by default: the server weighs
    sites by examples in its average and in ``c`` (``weighting="examples"``), so the method
    converges to the federation's objective, the one every other setting and the reported
    loss use; ``weighting="uniform"`` is the paper's equal weighting."""
    weighting = opts["weighting"]
    if not context.site_names:
        raise ConfigError("method 'scaffold' needs the training sites' names (N in the control update)")
    require_sgd("scaffold", context, "its control variates read (x - y) / (K lr) as the mean local gradient")
    if weighting == "examples":
        weights, average = context.site_sizes, weighted_mean()  # unknown sizes are learnt from the uploads
    else:
        weights, average = {site: 1.0 for site in context.site_names}, site_mean()
    aggregator = chain(scaffold_control(weights, weighting), average, apply_delta(opts["server_lr"]))
    return FederatedAlgorithm(
        "scaffold", scaffold_update, aggregator, broadcast=lambda state: {"server_control": state["scaffold_control"].control}
    )


def _fedsld(opts, training: Training, context: BuildContext) -> FederatedAlgorithm:
    """FedSLD (Luo & Wu, 2022): each batch's cross-entropy reweighted from its own label
    distribution to the federation's, over the K classes (binary: 2). Refused for multilabel,
    regression and segmentation targets: the paper's weights are one class per row, and a
    per-label or per-pixel version is not its method (the loss would need weights per output)."""
    aggregator = chain(label_distribution(context.label_counts), weighted_mean(), apply_delta())
    return FederatedAlgorithm(
        "fedsld", fedsld_update, aggregator, broadcast=lambda state: {"label_prior": federation_label_prior(state["label_distribution"].counts)}
    )


def _semisync(opts, training: Training, context: BuildContext) -> FederatedAlgorithm:
    speeds = check_speeds(opts["speeds"], context.site_names)
    rule = functools.partial(semisync_update, speeds=speeds)
    aggregator = chain(time_budget(opts["budget"]), weighted_mean(), apply_delta())
    return FederatedAlgorithm("semisync", rule, aggregator, broadcast=lambda state: {"budget": state["time_budget"].budget})


def _finetune(opts, training: Training, context: BuildContext) -> FederatedAlgorithm:
    personalize = functools.partial(
        finetune_personalize, steps=opts["finetune_steps"] or None, lr=opts["finetune_lr"] or None
    )
    return FederatedAlgorithm("finetune", local_sgd_update, _fedavg_server(), personalize=personalize)


def _apfl(opts, training: Training, context: BuildContext) -> FederatedAlgorithm:
    alpha = opts["alpha"]
    return FederatedAlgorithm(
        "apfl",
        functools.partial(apfl_update, alpha=alpha),
        _fedavg_server(),
        personalize=functools.partial(apfl_personalize, alpha=alpha),
    )


def _ditto(opts, training: Training, context: BuildContext) -> FederatedAlgorithm:
    lam, steps = opts["lam"], opts["personal_steps"] or None
    return FederatedAlgorithm(
        "ditto",
        functools.partial(ditto_update, lam=lam, personal_steps=steps),
        _fedavg_server(),
        personalize=functools.partial(ditto_personalize, lam=lam, personal_steps=steps),
    )


def _semisupervised(opts, training: Training, context: BuildContext) -> FederatedAlgorithm:
    """Semi-supervised FL (Yang et al., 2021a), FixMatch-style (Sohn et al., 2020): the received global
    model pseudo-labels a site's weakly augmented unlabeled rows above ``threshold``; local training adds
    those rows strongly augmented, weighted ``weight``. With no unlabeled row it is FedAvg, bit for bit.

    Departs from Yang 2021a, which adds a separate consistency loss between the predictions on two
    augmented views: here the consistency is FixMatch's, the strong view trained toward the weak
    view's confident label, so the model's own loss (and every model, numpy or torch) serves with
    no new loss term; the pseudo-labels come from the global model, as in the paper, not the local one.
    Departs from FixMatch in batching: labeled and pseudo-labeled rows share one mini-batch stream,
    each pseudo-labeled row weighing ``weight`` in the batch mean (FixMatch: two means, lambda between).

    Measured, breast-cancer (3 sites, logistic, 50 rounds, defaults; ACC/AUC averaged over the test sites,
    mean ± std over 3 repeats): 10% labels FedAvg 0.950±0.034/0.985±0.007, SemiSup 0.937±0.021/0.979±0.016;
    2% labels FedAvg 0.853±0.061/0.939±0.041, SemiSup 0.858±0.065/0.924±0.052; Mix with all labels
    0.978±0.005/0.990±0.003. It does not help here: within noise at 10 repeats and every option tried
    (threshold 0.8-0.99, weight 0.3, strong 0.1); a linear model on 30 features is already near its
    ceiling from a few labels. A round costs about 2.3x FedAvg's (the weak-view predictions, more rows).

    Segmentation (a U-Net): the pseudo-label is a mask, per voxel, unconfident voxels weighing nothing
    (weighted soft Dice + CE over the confident ones; :mod:`medfed.client.semisupervised`). Departs from
    FixMatch there: the weak and the strong view share one geometry (flip, shift), so that the mask
    predicted on the one lies on the other's grid; they differ in intensity jitter only.

    Measured, mni-phantom segmentation (32x32, lesion_mm 15, 60 images per site, 10% labels: about 5
    labeled and 44 unlabeled training images per site; unet2d, Adam, lr 0.01, 60 rounds; Dice averaged
    over the 3 test sites, seeds 0 / 1): FedAvg 0.024 / 0.140; SemiSup with the defaults 0.000 / 0.000
    (the pseudo-masks of an early model are confident background, and 44 of them at weight 1 outvote 5
    labeled images: the model collapses to background; threshold 0.99 alone, too); weight 0.1
    0.019 / 0.172; threshold 0.99 and weight 0.1 0.051 / 0.254. A site's round costs 3.7x FedAvg's
    (283 vs 76 ms: the weak-view prediction of 44 images, batches of 32 instead of 5).
    """
    rule = functools.partial(semisupervised_update, threshold=opts["threshold"], weight=opts["weight"],
                             weak=opts["weak"], strong=opts["strong"])
    return FederatedAlgorithm("semisupervised", rule, _fedavg_server())


def _vat(opts, training: Training, context: BuildContext) -> FederatedAlgorithm:
    """Virtual adversarial training (Miyato et al., 2018) in FL (Zhu & Luo, 2022): each site moves each
    of its rows ``eps`` along the direction that most changes the received model's prediction (one power
    iteration from a random ``xi``-perturbation of the KL) and trains on the rows plus these neighbours,
    labeled as their rows, weighted ``weight``. ``eps = 0`` is FedAvg, bit for bit.

    Departs from Miyato 2018, which adds the KL between the predictions at a row and at its neighbour
    (the LDS term, no label needed) and recomputes the direction at every step: here the neighbours are
    made once a round, under the model the site received, and trained toward their rows' labels, so the
    models' own losses (numpy and torch) serve through the one optimizer path with no new loss term;
    that is the issue's "trains on them as well" (Zhu & Luo's synthetic neighbours), and it reads the
    labeled rows only. ``xi`` defaults to 1e-3, not the paper's 1e-6: a float32 torch model would round a
    1e-6 move of a standardized feature to noise.

    Measured, breast-cancer (3 sites, logistic, 50 rounds, defaults; ACC/AUC averaged over the test sites,
    mean ± std over 3 repeats): 10% labels FedAvg 0.950±0.034/0.985±0.007, VAT 0.951±0.031/0.984±0.005;
    all labels FedAvg 0.978±0.005/0.990±0.003, VAT 0.970±0.012/0.990±0.005. It does not help here: eps 0.25
    matches FedAvg to 3 decimals, eps 2 and 4 lower ACC (10%: 0.907, 0.871) at an unchanged AUC; a linear
    model's direction is +-w for every row, so the neighbours mostly shift the rows across its boundary.
    A site's round costs about 3x FedAvg's (full batch: 463 vs 142 us; batches of 32: 455 vs 160 us,
    interleaved, 359 rows): twice the rows, plus one prediction and one input-gradient pass.
    """
    rule = functools.partial(vat_update, eps=opts["eps"], xi=opts["xi"], weight=opts["weight"])
    return FederatedAlgorithm("vat", rule, _fedavg_server())


def _distill(opts, training: Training, context: BuildContext) -> FederatedAlgorithm:
    """Federated distillation (Kumar et al., 2021a) with Hinton et al.'s (2015) loss: each site trains
    on ``(1 - weight) CE + weight T² KL(teacher^T || student^T)``, the teacher a saved medfed model the
    site scores its own rows with. ``weight = 0`` is FedAvg, bit for bit.

    Departs from Kumar et al. (who distill a large network into a small one at each site): the teacher
    is any saved medfed classifier (numpy or torch) of the study's features, task and classes, or a
    torch state dict loaded into the student's own architecture, and it scores the rows as the
    student's run preprocessed them (a teacher trained on the same data and scaling sees what it was
    trained on; one with another scaling sees rows in the student's scale). The student is the study's
    model, numpy or torch (the torch head's loss seam). With ``unlabeled`` (default) the soft term
    also runs on the site's unlabeled rows, each row one term of the batch mean.

    Measured, breast-cancer (3 sites, logistic, 50 rounds, T = 2, weight = 0.5; teacher: Mix on all
    labels with --save-model at the same seed, so it never saw the student's test rows; ACC/AUC
    averaged over the test sites, mean ± std over seeds 0, 1, 2): 10% labels FedAvg 0.956±0.034 /
    0.990±0.003, Distill (labeled rows only) 0.968±0.010 / 0.992±0.002; 2% labels FedAvg 0.894±0.059 /
    0.943±0.046, Distill labeled only 0.920±0.068 / 0.964±0.046, Distill with the unlabeled rows
    (default) 0.936±0.032 / 0.988±0.005; the teacher 0.975±0.004 / 0.990±0.001. At 2% labels the
    unlabeled rows carry the teacher to nearly its own AUC; labeled only, it helps within one std.
    A round costs about 1.5x FedAvg's at 10% labels (0.85 vs 0.56 ms, 500 rounds), 1.8x with all
    labels: the teacher's logits and the soft term; with the unlabeled rows at 2% labels about 2.4x
    (0.12 vs 0.05 s for 50 rounds). mni-phantom (cnn2d, 16 x 16, 150 images a site, 20 rounds x 5
    steps, lr 0.001, teacher a saved cnn2d Mix) is near chance at that budget (teacher AUC
    0.588±0.080; FedAvg 0.498±0.083, Distill labeled only 0.500±0.132, with unlabeled 0.543±0.045;
    a run 2.8x FedAvg's: the teacher scores 118 unlabeled images a site, the student trains on them);
    at 60 rounds the teacher 0.730±0.025, FedAvg 0.541±0.140, labeled only 0.561±0.144, with
    unlabeled 0.693±0.067 (2% labels; 3 seeds; run times on shared cores too noisy to quote).
    """
    soft = Distillation(opts["temperature"], opts["weight"])
    rule = functools.partial(distill_update, teacher=context.teacher, soft=soft, unlabeled=opts["unlabeled"])
    return FederatedAlgorithm("distill", rule, _fedavg_server())


def _spec(name, display, summary, reference, options: tuple[Option, ...], build, *, personal=False,
          tasks: tuple[str, ...] | None = None, unlabeled=False) -> Method:
    return Method(
        name, display, "federated", summary, reference, options, build, uploads="delta", personal=personal,
        family=FAMILY, unlabeled=unlabeled, **({} if tasks is None else {"tasks": tasks}),
    )


CLIENT_METHODS: list[Method] = [
    _spec(
        "scaffold", "SCAFFOLD",
        "control variates correct each local gradient for the site's drift (option II; plain SGD steps); "
        "weighting: examples (the federation's objective) or uniform (the paper: sites weigh equally)",
        "Karimireddy et al., 2020",
        (SERVER_LR, choice("weighting", "examples", SCAFFOLD_WEIGHTINGS, "site weights in the average and in c")),
        _scaffold,
    ),
    _spec(
        "fedsld", "FedSLD",
        "cross-entropy reweighted by each batch's label distribution relative to the federation's "
        "(label counts leave the sites)",
        "Luo & Wu, 2022", (), _fedsld,
        tasks=("binary", "multiclass"),  # its label counts and row weights are one class per row
    ),
    _spec(
        "semisync", "SemiSync",
        "each site runs as many local steps as fit a shared time budget, by its speed (examples/s) "
        "and rows per step (budget 0 = the slowest site's time for local_steps)",
        "Stripelis et al., 2021",
        (
            per_site("speeds", "examples per second at each site (others: 1)", range=above(0)),
            number("budget", 0.0, "seconds of local work per round (0 = the slowest site's synchronous time)",
                   range=at_least(0)),
        ),
        _semisync,
    ),
    _spec(
        "finetune", "FineTune",
        "FedAvg, then each site fine-tunes the final global model on its training rows "
        "(finetune_steps/finetune_lr 0 = the training's)",
        "Wicaksana et al., 2022a; Tan et al., 2022",
        (
            whole("finetune_steps", 0, "fine-tuning steps (0 = local_steps)", range=at_least(0)),
            number("finetune_lr", 0.0, "fine-tuning learning rate (0 = the training's lr)", range=at_least(0)),
        ),
        _finetune, personal=True,
    ),
    _spec(
        "apfl", "APFL",
        "each site keeps a local model; its personal model mixes it with the global one (alpha: local weight)",
        "Deng et al., 2020; Jiang et al., 2023",
        (number("alpha", 0.5, "APFL's mixing weight of the local model", range=closed(0, 1), flag="--alpha"),),
        _apfl, personal=True,
    ),
    _spec(
        "ditto", "Ditto",
        "FedAvg plus a personal model per site with a proximal pull (lam/2)||v - w||^2 toward the global "
        "(personal_steps 0 = local_steps)",
        "Li et al., 2021; T Dinh et al., 2020",
        (
            number("lam", 0.1, "Ditto's pull of the personal model toward the global one; (lam/2)||v - w||^2",
                   range=at_least(0), flag="--lam"),
            whole("personal_steps", 0, "personal steps per round (0 = local_steps)", range=at_least(0)),
        ),
        _ditto, personal=True,
    ),
    _spec(
        "semisupervised", "SemiSup",
        "the global model pseudo-labels each site's weakly augmented unlabeled rows above a confidence "
        "threshold; local training adds them strongly augmented, weighted (FixMatch-style; none unlabeled: FedAvg)",
        "Yang et al., 2021a; Sohn et al., 2020",
        (
            number("threshold", 0.95, "top probability a pseudo-label (of a row, or a voxel) needs", range=closed(0, 1)),
            number("weight", 1.0, "weight (lambda) of a pseudo-labeled row (image) in the batch's mean loss",
                   range=at_least(0)),
            number("weak", 0.05, "weak augmentation: feature-noise sigma (tables), intensity jitter (images)",
                   range=at_least(0)),
            number("strong", 0.5, "strong augmentation: feature-noise sigma (tables), intensity jitter plus a "
                   "shift (images; segmentation: the weak view's flip and shift, a stronger jitter)", range=at_least(0)),
        ),
        _semisupervised,
        tasks=("binary", "multiclass", "segmentation"),  # a pseudo-label is one class per row, or per voxel
        unlabeled=True,
    ),
    _spec(
        "vat", "VAT",
        "each site trains on its rows plus virtual adversarial neighbours: each row moved eps along the "
        "direction that most changes the received model's prediction (KL, one power iteration; eps 0: FedAvg)",
        "Miyato et al., 2018; Zhu & Luo, 2022",
        (
            number("eps", 1.0, "distance of a neighbour from its row (features are standardized)", range=at_least(0)),
            number("xi", 1e-3, "size of the random perturbation the power iteration differentiates at",
                   range=above(0)),
            number("weight", 1.0, "weight of a neighbour in the batch's mean loss", range=at_least(0)),
        ),
        _vat,
        tasks=("binary", "multiclass", "regression"),  # the KL of a per-row prediction; not per pixel
    ),
    _spec(
        "distill", "Distill",
        "each site trains toward a teacher model's softened outputs on its own rows: (1 - weight) CE + "
        "weight T^2 KL(teacher^T || student^T) (weight 0: FedAvg)",
        "Kumar et al., 2021a; Hinton et al., 2015",
        (
            Option("teacher", "", "str", "a saved medfed model file (medfed run --save-model) or a torch state dict (.pt, "
                   "loaded into the study's model) the sites distill from",
                   flag="--teacher"),
            number("temperature", 2.0, "softmax temperature T of the teacher's and student's outputs",
                   range=above(0)),
            number("weight", 0.5, "weight (lambda) of the distillation term; 0 = plain cross-entropy",
                   range=closed(0, 1)),
            boolean("unlabeled", True, "also distill on the site's unlabeled rows (the soft term alone)"),
        ),
        _distill,
        tasks=("binary", "multiclass"),  # soft targets of one class per row
        unlabeled=lambda opts: bool(opts["unlabeled"]) and float(opts["weight"]) > 0,  # the soft term on them
    ),
]
