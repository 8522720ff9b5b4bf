"""Gradient-inversion audit (survey §2.1, §7.1.2; issue 10 §5): an honest-but-curious server
attacks one site's upload and tries to rebuild that site's training images.

The victim is a site of the federation (``site``, default the first). From the global model
(the initial one, or after ``rounds`` FedAvg rounds of every site with the study's training)
it computes its real upload through medfed's own site rule (the method's ``local_update``
from the methods registry: FedAvg's :func:`~medfed.client.local.local_sgd_update`, FedPer's
:func:`~medfed.client.sharing.keep_private` around it), on ``batch_size`` of its training
images (a keyed draw) with ``local_steps`` local steps, each a full pass over those images:
the upload carries exactly those images, no others.

What the attacker sees, per setting:

- DP (``noise_multiplier`` z > 0): the upload clipped to L2 norm C by the site's DP rule
  (:func:`medfed.methods.privacy.client_dp_site`, as ``--dp client`` clips) plus Gaussian
  noise of standard deviation z·C on every coordinate, i.e. noise added before the upload
  leaves the site (``--dp distributed``'s total noise). With ``--dp client`` the server adds
  the noise itself and sees the clipped upload un-noised: against the server that protects
  by clipping only.
- Sharing ``fedper``: the head's update never leaves the site; the attacker has the body's.
- Secure aggregation: only the SUM of K sites' uploads (the victim and the next K-1 sites,
  each on its own ``batch_size`` images), with DP's noise once on the sum.

Attacks:

- Label recovery, iDLG (Zhao et al., 2020). iDLG reads a one-image label from the sign of
  the last layer's gradient. With medfed's one-logit head the rule carries over to the bias:
  the head bias' gradient is ``sigmoid(z) - y``, negative exactly when y = 1, so its update
  (minus the gradient, summed over the local steps; the bias has no L2 term, and Adam's
  step keeps the gradient's sign) is positive exactly when y = 1, at any number of local
  steps. The rule applies when the observed head update comes from ONE image (batch 1, no
  secure aggregation, head shared); otherwise labels are optimized with the images, as soft
  labels (DLG, Zhu et al., 2019). Multiclass (K logits, cross-entropy): the bias' gradient is
  ``softmax(z) - onehot(y)``, negative at the true class only, so the update is largest there
  (iDLG's own rule); DLG's soft labels are a softmax over K label logits per image.
- Image reconstruction, "Inverting gradients" (Geiping et al., 2020): dummy images (random
  normal start, keyed) are optimized with Adam on signed gradients (lr 0.1, decayed 10x at
  3/8, 5/8 and 7/8 of ``attack_steps``) to minimize ``1 - cos(dummy update, observed
  update) + tv * TV(dummy)`` (anisotropic total variation, mean absolute neighbour
  difference). The dummy update is the attacker's simulation of the site's local training:
  Geiping's multi-step variant, ``local_steps`` full-batch SGD steps at the study's lr and
  L2, differentiated through. Departures: the cosine runs over the BODY's trainable
  parameters the attacker sees (the head's update is orders of magnitude larger and holds
  only pooled features: in the objective it drowns the body's, which carries the image, and
  it already gave the labels; BatchNorm's running statistics are left out); with
  ``optimizer=adam`` the site's steps are simulated as SGD (the update's direction matched
  as if a gradient: Adam's step ``m / sqrt(v)`` is nearly a sign, whose derivative is zero
  almost everywhere), so against Adam uploads the attack is weak; no restarts.

Metrics per image: PSNR and SSIM (scikit-image) on the model's input scale (the
standardized images), data range = max - min of the victim site's training images, each
reconstruction clipped to that range. Reconstructions come in no order: each original gets
its own reconstruction by the best assignment on PSNR (``linear_sum_assignment``; with
secure aggregation there are K·B reconstructions for the victim's B images). The baseline
is the same score of the attack's random starting images; the prior that of the other sites'
mean training image, a guess the server makes without any upload (images of one anatomy,
like mni-phantom's, score 15-16 dB that way: a reconstruction must beat the prior, not only
the random start, to show what the upload gave away). This is ONE attack with a fixed
budget: a lower bound on what an upload leaks, not a proof that it leaks nothing.

Tasks: binary and multiclass, where the site's loss is a cross-entropy on class labels and iDLG
is defined. The other tasks are refused before training: their targets (a value, several 0/1
labels, a mask) are not one class per image, so there is no label to recover and the attacker,
who must simulate the site's loss, would have to invert targets it does not know as well.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfed.client.drift import label_counts
from medfed.client.local import LocalData
from medfed.errors import ConfigError
from medfed.experiments.config import ExperimentConfig
from medfed.experiments.harness import (
    TRAIN_STREAM,
    ScaledViews,
    TrainingPlan,
    federated_failure,
    load_federation,
    prepare_repeat,
    repeat_harmonizer,
)
from medfed.experiments.results import package_versions
from medfed.methods import resolve_methods
from medfed.models.registry import is_head, is_norm, is_norm_statistic
from medfed.rng import KeyedRng, name_key

SHARING = {"none": "fedavg", "fedper": "fedper"}  # sharing policy -> the method whose site rule uploads
BASE = {"batch_size": 1, "local_steps": 1, "noise_multiplier": 0.0, "sharing": "none", "secure_aggregation": False}
DEFAULT_SWEEP = {"batch_size": (1, 4, 8), "local_steps": (1, 5), "noise_multiplier": (0.0, 0.1, 1.0),
                 "sharing": ("none", "fedper"), "secure_aggregation": (False, True)}
FACTORS = tuple(BASE)
TORCH_MODELS = ("cnn2d", "mlp", "torch_logistic")
LABEL_TASKS = ("binary", "multiclass")  # one class per image, a cross-entropy loss: what iDLG and DLG recover
ROWS_STREAM = name_key("leakage-victim-rows")
NOISE_STREAM = name_key("leakage-dp-noise")
ATTACK_STREAM = name_key("leakage-attack")
UPLOAD_STREAM = name_key("leakage-upload")
ATTACK_LR = 0.1  # Geiping et al.'s Adam step on signed gradients
GRID_IMAGES = 4  # images per setting shown in the PNG grid


@dataclass(frozen=True)
class Setting:
    """One attacked configuration of the victim's upload."""

    batch_size: int
    local_steps: int
    noise_multiplier: float
    sharing: str
    secure_aggregation: bool

    def label(self) -> str:
        return (f"batch {self.batch_size}, steps {self.local_steps}, noise {self.noise_multiplier:g}, "
                f"sharing {self.sharing}, secure aggregation {'on' if self.secure_aggregation else 'off'}")


@dataclass(frozen=True)
class AttackSpec:
    """The attack's budget and the attacker's view: ``steps`` Adam iterations, TV weight
    ``tv``, DP clip ``clip``, ``secagg_sites`` K summed under secure aggregation."""

    steps: int = 1000
    tv: float = 1e-4
    clip: float = 1.0
    secagg_sites: int | None = None
    site: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"--attack-steps must be a whole number >= 1, got {self.steps!r}")
        if not math.isfinite(self.tv) or self.tv < 0:
            raise ConfigError(f"--tv must be a finite number >= 0, got {self.tv!r}")
        if not math.isfinite(self.clip) or self.clip <= 0:
            raise ConfigError(f"--clip must be a finite number > 0, got {self.clip!r}")
        if self.secagg_sites is not None and self.secagg_sites < 2:
            raise ConfigError(f"--secagg-sites must be >= 2 (the sum of the victim and others), got {self.secagg_sites}")


def sweep(values: dict[str, Sequence[Any]]) -> tuple[list[Setting], str]:
    """The settings to attack: one factor at a time around the base (batch 1, steps 1, noise 0,
    sharing none, secure aggregation off, or a factor's first value where the base is not
    listed), each other value of each factor once; and a sentence saying so."""
    base = {f: (BASE[f] if BASE[f] in values[f] else values[f][0]) for f in FACTORS}
    settings = [Setting(**base)]
    for f in FACTORS:
        settings += [Setting(**{**base, f: v}) for v in values[f] if v != base[f]]
    varied = [f for f in FACTORS if len(values[f]) > 1]
    how = ("one factor at a time around the base setting " + Setting(**base).label()
           + (f" (varied: {', '.join(varied)})" if varied else "; nothing varied"))
    return settings, how


def parse_factor(flag: str, items: Sequence[str] | None, factor: str) -> tuple:
    """A factor's values from its flag's comma list (``None``: the default sweep's)."""
    if items is None:
        return DEFAULT_SWEEP[factor]
    out: list[Any] = []
    for item in items:
        text = str(item).strip().lower()
        try:
            if factor in ("batch_size", "local_steps"):
                value: Any = int(text)
                if value < 1:
                    raise ValueError
            elif factor == "noise_multiplier":
                value = float(text)
                if not math.isfinite(value) or value < 0:
                    raise ValueError
            elif factor == "sharing":
                if text not in SHARING:
                    raise ValueError
                value = text
            else:
                value = {"off": False, "on": True}[text]
        except (ValueError, KeyError):
            allowed = {"batch_size": "whole numbers >= 1", "local_steps": "whole numbers >= 1",
                       "noise_multiplier": "numbers >= 0 (0: no DP)", "sharing": " or ".join(SHARING),
                       "secure_aggregation": "off or on"}[factor]
            raise ConfigError(f"{flag} takes comma-separated {allowed}, got {item!r}") from None
        if value in out:
            raise ConfigError(f"{flag} lists {item!r} twice")
        out.append(value)
    if not out:
        raise ConfigError(f"{flag} needs at least one value")
    return tuple(out)


# --------------------------------------------------------------------------- the attacker's torch


@contextmanager
def _threads(n: int):
    """torch's intra-op threads set to the model's ``threads`` option inside (the numbers
    depend on it, see :mod:`medfed.models.torch_models`), the caller's restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Simulator:
    """The attacker's differentiable copy of the site's local training on dummy images.

    ``start`` holds the trainable tensors of the global model (the site's starting point),
    ``buffers`` the BatchNorm statistics; ``visible`` the trainable names the attacker sees;
    ``head`` the model's task head, whose loss the site trains on."""

    net: Any
    head: Any
    start: dict[str, Any]
    buffers: dict[str, Any]
    visible: tuple[str, ...]
    decayed: frozenset[str]
    lr: float
    l2: float
    steps: int

    @classmethod
    def of(cls, model, sample_shape, params, visible, lr: float, l2: float, steps: int) -> Simulator:
        import torch

        net = model.network(sample_shape).to(dtype=model.dtype)
        net.train()  # the site trains in train mode: BatchNorm on batch statistics
        trainable = [k for k, _ in net.named_parameters()]
        buffers = {k: torch.as_tensor(params[k], dtype=model.dtype) for k, _ in net.named_buffers() if k in params}
        start = {k: torch.as_tensor(params[k], dtype=model.dtype) for k in trainable}
        # the L2 term runs over the conv/linear/head weights, as in the model's objective
        decayed = frozenset(k for k in trainable if k.endswith(".weight") and not is_norm(k))
        return cls(net, model.head, start, buffers, tuple(k for k in trainable if k in visible), decayed, lr, l2,
                   steps)

    @property
    def classes(self) -> int:
        """The head's logits per image: 1 (binary, a 0/1 target) or K (multiclass, class probabilities)."""
        return self.head.outputs

    def update(self, x, labels) -> list:
        """The visible part of ``local - global`` after the local steps on ``(x, labels)`` (binary:
        0/1 targets; multiclass: each image's class probabilities, which cross-entropy takes as they are)."""
        import torch
        from torch.func import functional_call

        p = {k: v.detach().requires_grad_(True) for k, v in self.start.items()}
        params = dict(p)
        for _ in range(self.steps):
            z = functional_call(self.net, ({**params}, {k: v.clone() for k, v in self.buffers.items()}), (x,))
            loss = self.head.torch_loss(z, labels, "mean")
            if self.l2:
                loss = loss + 0.5 * self.l2 * sum((params[k] ** 2).sum() for k in self.decayed)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {k: v - self.lr * g for (k, v), g in zip(params.items(), grads)}
        return [(params[k] - p[k]).flatten() for k in self.visible]


def total_variation(x):
    """Anisotropic TV of a batch of images: mean absolute difference of neighbours (both axes)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


@dataclass(frozen=True)
class Reconstruction:
    images: np.ndarray  # (M, C, H, W): K groups of B dummy images, in group order
    start: np.ndarray  # the random images the attack started from
    labels: np.ndarray  # the labels the attack used (recovered or optimized), rounded
    loss: float  # the final objective


def invert(sim: Simulator, observed: Sequence, groups: int, per_group: int, sample_shape, labels: np.ndarray | None,
           steps: int, tv: float, seed: int) -> Reconstruction:
    """Geiping et al. (2020): optimize ``groups * per_group`` dummy images so that the sum of
    each group's simulated update points the way the observed one does. ``labels`` fixes the
    labels (iDLG); ``None`` optimizes them as soft labels with the images (DLG)."""
    import torch
    import torch.nn.functional as F

    dtype = next(iter(sim.start.values())).dtype
    gen = torch.Generator().manual_seed(seed)
    n = groups * per_group
    x = torch.randn((n, *sample_shape), generator=gen, dtype=dtype)
    start = x.numpy().copy()
    x.requires_grad_(True)
    variables = [x]
    K = sim.classes
    soft = torch.sigmoid if K == 1 else (lambda logits: torch.softmax(logits, dim=1))
    if labels is None:
        label_logits = torch.zeros((n,) if K == 1 else (n, K), dtype=dtype, requires_grad=True)
        variables.append(label_logits)
    target = torch.cat([torch.as_tensor(np.asarray(o), dtype=dtype).flatten() for o in observed])
    optimizer = torch.optim.Adam(variables, lr=ATTACK_LR)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
    fixed = None if labels is None else (torch.as_tensor(labels, dtype=dtype) if K == 1 else
                                         F.one_hot(torch.as_tensor(labels, dtype=torch.int64), K).to(dtype))
    loss_value = math.nan
    for _ in range(steps):
        optimizer.zero_grad()
        y = soft(label_logits) if fixed is None else fixed
        parts = [sim.update(x[g * per_group:(g + 1) * per_group], y[g * per_group:(g + 1) * per_group])
                 for g in range(groups)]
        dummy = torch.cat([sum(p[i] for p in parts) for i in range(len(parts[0]))])
        loss = 1 - F.cosine_similarity(dummy, target, dim=0) + tv * total_variation(x)
        loss.backward()
        for v in variables:
            v.grad.sign_()  # Geiping et al.: Adam on the gradient's sign
        optimizer.step()
        scheduler.step()
        loss_value = float(loss.detach())
    used = (fixed if fixed is not None else soft(label_logits.detach())).numpy()
    chosen = np.round(used) if K == 1 else np.argmax(used, axis=1)
    return Reconstruction(x.detach().numpy().astype(np.float64), start.astype(np.float64),
                          chosen.astype(int), loss_value)


def idlg_label(head_bias_update) -> int:
    """iDLG's rule for one image: a one-logit head's bias update is ``-lr`` times the sum of
    ``sigmoid(z) - y`` over the steps, positive exactly when y = 1; a K-logit head's is ``-lr``
    times the sum of ``softmax(z) - onehot(y)``, positive at the true class only (its argmax)."""
    update = np.ravel(head_bias_update)
    return int(update[0] > 0) if update.size == 1 else int(np.argmax(update))


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Scores:
    psnr: list[float]
    ssim: list[float]
    matched: list[int]  # the reconstruction each original got


def match_and_score(originals: np.ndarray, reconstructions: np.ndarray, low: float, high: float) -> Scores:
    """PSNR and SSIM of each original against its own reconstruction, assigned to maximize the
    total PSNR (order is unknown to the attacker); reconstructions clipped to [low, high]."""
    from scipy.optimize import linear_sum_assignment
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = high - low
    recs = np.clip(reconstructions, low, high)
    psnr = np.array([[peak_signal_noise_ratio(o, r, data_range=rng) for r in recs] for o in originals])
    rows, cols = linear_sum_assignment(psnr, maximize=True)
    order = np.argsort(rows)
    matched = [int(c) for c in cols[order]]

    def ssim(a, b):
        # images are (C, H, W); the window shrinks (odd, >= 3) on images smaller than 7 pixels
        win = min(7, *a.shape[1:])
        win -= 1 - win % 2
        return float(structural_similarity(a, b, data_range=rng, channel_axis=0, win_size=win))

    return Scores([float(psnr[i, j]) for i, j in enumerate(matched)],
                  [ssim(originals[i], recs[j]) for i, j in enumerate(matched)], matched)


# --------------------------------------------------------------------------- the audit


def _check(config: ExperimentConfig, federation, attack: AttackSpec, settings: list[Setting]) -> tuple[int, list[int]]:
    """Everything that would fail mid-audit, refused before any training: the victim's index
    and the indices of the sites summed under secure aggregation."""
    if federation.task not in LABEL_TASKS:
        raise ConfigError(f"the leakage audit recovers class labels (iDLG) and images from a classifier's upload; "
                          f"{federation.name!r} is a {federation.task} task ({federation.task_source}): it attacks "
                          f"{' or '.join(LABEL_TASKS)} tasks only")
    if config.model == "logistic":
        raise ConfigError("--model logistic is the numpy model: the leakage audit inverts torch models "
                          f"({', '.join(TORCH_MODELS)})")
    if config.model not in TORCH_MODELS:
        raise ConfigError(f"--model {config.model}: the leakage audit inverts 2D image models ({', '.join(TORCH_MODELS)})")
    from medfed.experiments.harmonization import check_harmonization

    check_harmonization(config, federation)  # [harmonize] applies here as in medfed run (combat on images refused)
    smallest = min(s.batch_size for s in settings)
    if config.model != "cnn2d" and config.model_options.get("norm", "batch" if config.model == "mlp" else "none") == "batch" \
            and smallest < 2:
        raise ConfigError(f"--batch-sizes {smallest}: model {config.model!r} with norm=batch needs at least 2 images per "
                          "batch; give --model-option norm=none (or group) or batch sizes >= 2")
    shape = federation.sample_shape
    if len(shape) != 3:
        raise ConfigError(f"the leakage audit rebuilds 2D images (C, H, W); {federation.name!r} has samples of "
                          f"shape {shape}")
    names = list(federation.site_names)
    victim = names.index(attack.site) if attack.site in names else None
    if attack.site is None:
        victim = 0
    if victim is None:
        raise ConfigError(f"--site {attack.site!r} is not a site of {federation.name!r}; its sites: {', '.join(names)}")
    k = attack.secagg_sites or len(names)
    if any(s.secure_aggregation for s in settings):
        if len(names) < 2:
            raise ConfigError(f"secure aggregation sums the uploads of K >= 2 sites; {federation.name!r} has one site")
        if k > len(names):
            raise ConfigError(f"--secagg-sites {k}: {federation.name!r} has {len(names)} sites")
    group = [(victim + i) % len(names) for i in range(k)]
    return victim, group


def _victim_rows(n: int, seed: int, site: str, size: int) -> np.ndarray:
    """The first ``size`` rows of a keyed permutation of a site's training rows (the same
    images lead every setting: batch 4 holds batch 1's image)."""
    return KeyedRng(seed, (ROWS_STREAM, name_key(site))).generator.permutation(n)[:size]


def _observed(plan: TrainingPlan, global_params, datas: list[LocalData], setting: Setting, attack: AttackSpec,
              algorithm, seed: int) -> dict[str, np.ndarray]:
    """What the server sees: the sum of the sites' uploads (one site without secure
    aggregation), each clipped under DP, with noise z*C on the sum."""
    local = dataclasses.replace(plan.local, steps=setting.local_steps, batch_size=setting.batch_size, epochs=None)
    total: dict[str, np.ndarray] = {}
    for data in datas:
        rng = KeyedRng(seed, (UPLOAD_STREAM, name_key(data.name)))
        upload, _ = algorithm.local_update(global_params, data, local, None, rng)
        for k, v in upload.payload.items():
            total[k] = total.get(k, 0.0) + np.asarray(v, dtype=np.float64)
    if setting.noise_multiplier > 0:
        gen = KeyedRng(seed, (NOISE_STREAM,)).generator
        std = setting.noise_multiplier * attack.clip
        total = {k: v + gen.normal(0.0, std, size=v.shape) for k, v in total.items()}
    return total


def _attack_setting(plan, config, global_params, sites_data: list[LocalData], victim_rows, setting: Setting,
                    attack: AttackSpec, algorithms, low, high, prior_image, index: int) -> dict[str, Any]:
    """Upload, recover labels, invert, score one setting (and the prior image, for comparison)."""
    model = plan.model
    groups = len(sites_data) if setting.secure_aggregation else 1
    datas = sites_data[:groups]
    observed = _observed(plan, global_params, datas, setting, attack, algorithms[setting.noise_multiplier > 0,
                                                                                 setting.sharing], config.seed)
    trainable = [k for k in observed if not is_norm_statistic(k)]
    # the head's update dwarfs the body's and holds only pooled features: it gives the labels,
    # the body's update the images (a model that is all head, torch_logistic, gives both)
    visible = tuple(k for k in trainable if not is_head(k)) or tuple(trainable)
    sim = Simulator.of(model, datas[0].X.shape[1:], global_params, visible, plan.local.lr, plan.local.l2,
                       setting.local_steps)
    one_image = setting.batch_size * groups == 1 and "head.bias" in observed
    labels = np.array([idlg_label(observed["head.bias"])]) if one_image else None
    seed = int(KeyedRng(config.seed, (ATTACK_STREAM, index)).generator.integers(2**62))
    with _threads(model.options["threads"]):
        rec = invert(sim, [observed[k] for k in sim.visible], groups, setting.batch_size, datas[0].X.shape[1:],
                     labels, attack.steps, attack.tv, seed)
    originals = datas[0].X
    scores = match_and_score(originals, rec.images, low, high)
    baseline = match_and_score(originals, rec.start, low, high)
    prior = None if prior_image is None else match_and_score(
        originals, np.repeat(prior_image[None], len(originals), axis=0), low, high)
    truth = datas[0].y.astype(int)
    recovered = [int(rec.labels[j]) for j in scores.matched]
    return {
        **dataclasses.asdict(setting),
        "sites_summed": [d.name for d in datas],
        "visible_parameters": list(sim.visible),
        "label_rule": "idlg" if one_image else "optimized",
        "label_accuracy": float(np.mean([r == t for r, t in zip(recovered, truth)])),
        "psnr": float(np.mean(scores.psnr)),
        "ssim": float(np.mean(scores.ssim)),
        "baseline_psnr": float(np.mean(baseline.psnr)),
        "baseline_ssim": float(np.mean(baseline.ssim)),
        "prior_psnr": None if prior is None else float(np.mean(prior.psnr)),
        "prior_ssim": None if prior is None else float(np.mean(prior.ssim)),
        "final_loss": rec.loss,
        "images": [{"row": int(r), "label": int(t), "recovered_label": lab, "psnr": p, "ssim": s,
                    "baseline_psnr": bp}
                   for r, t, lab, p, s, bp in zip(victim_rows, truth, recovered, scores.psnr, scores.ssim,
                                                  baseline.psnr)],
        # for the PNG grid only (dropped from the JSON): originals and their matched reconstructions
        "_pictures": (originals[:GRID_IMAGES], np.clip(rec.images[scores.matched[:GRID_IMAGES]], low, high)),
    }


def run_leakage_audit(
    config: ExperimentConfig,
    attack: AttackSpec,
    settings: list[Setting],
    how: str,
    *,
    rounds: int = 1,
    federation=None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Attack the victim site's upload in every setting and return the audit document.

    ``config`` gives the data, the model, the split, the scaling and the training (lr, L2 and,
    for the ``rounds`` FedAvg rounds before the attack, everything else); ``settings`` the
    batch sizes, local steps, noise, sharing and secure aggregation of the attacked upload."""
    started = time.perf_counter()
    federation = federation if federation is not None else load_federation(config.data)
    victim, group = _check(config, federation, attack, settings)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"--rounds must be a whole number >= 0 (0: attack the initial model), got {rounds!r}")
    plan = TrainingPlan.of(config, federation)
    sites = prepare_repeat(federation, config, 0)
    train, _ = ScaledViews(sites, config.scaling, repeat_harmonizer(config, federation, sites))(
        tuple(range(len(sites))))
    largest = max(s.batch_size for s in settings)
    for j in {victim, *(group if any(s.secure_aggregation for s in settings) else [])}:
        if largest > train[j].n:
            raise ConfigError(f"--batch-sizes {largest}: site {train[j].name!r} has {train[j].n} training rows; give "
                              f"batch sizes up to {train[j].n}")
    by_name = {spec.name: (spec, opts) for spec, opts in resolve_methods(sorted({SHARING[s.sharing] for s in settings}), {})}
    counts = {d.name: label_counts(d.y) for d in train}
    names = [d.name for d in train]
    algorithms = {}
    for s in settings:
        key = (s.noise_multiplier > 0, s.sharing)
        if key not in algorithms:
            spec, opts = by_name[SHARING[s.sharing]]
            algorithm = plan.build(spec, opts, names, counts)
            if key[0]:
                from medfed.methods.privacy import client_dp_site

                algorithm = client_dp_site(algorithm, attack.clip)
            algorithms[key] = algorithm

    global_params = plan.initial(federation, 0)
    notes = []
    if rounds:
        if progress:
            progress(f"{rounds} FedAvg round(s) before the attack")
        (spec, opts), = resolve_methods(["fedavg"], {})
        run_config = config.model_copy(update={"training": config.training.model_copy(update={"rounds": rounds})})
        run = TrainingPlan.of(run_config, federation).federated(
            spec, opts, train, global_params, KeyedRng(config.seed, (TRAIN_STREAM, 0, name_key(spec.name))))
        failure = federated_failure(run)
        if failure is not None:
            raise ConfigError(f"the FedAvg rounds before the attack failed ({failure.reason}); lower --lr or --rounds")
        global_params = run.params
    if plan.model.options.get("optimizer") == "adam":
        notes.append("the site trains with Adam, the attack simulates SGD steps: against Adam's nearly sign-like "
                     "update this attack is weak, so a low PSNR here does not mean the upload is safe (audit with "
                     "--model-option optimizer=sgd to see what plain SGD uploads leak)")
    if not rounds and all(not np.any(v) for k, v in global_params.items() if is_head(k) and k.endswith("weight")):
        notes.append("the initial model's head is zero, so one local step moves only the head: the body's update "
                     "(what carries the image) is zero; use --rounds >= 1 to attack a trained model")

    # the victim first, then the sites summed with it under secure aggregation
    sites_data = [(train[j], _victim_rows(train[j].n, config.seed, train[j].name, largest)) for j in group]
    victim_rows = sites_data[0][1]
    low, high = float(train[victim].X.min()), float(train[victim].X.max())
    # what the server could guess without any upload: the mean image of the other sites (for
    # data of one anatomy, like mni-phantom, a high PSNR; a reconstruction below it shows
    # little beyond "an image of this kind")
    others = [d.X for j, d in enumerate(train) if j != victim]
    prior_image = np.concatenate(others).mean(axis=0) if others else None
    records = []
    for i, setting in enumerate(settings):
        if progress:
            progress(f"attack {i + 1}/{len(settings)}: {setting.label()}")
        datas = [LocalData(d.name, d.X[r[:setting.batch_size]], d.y[r[:setting.batch_size]]) for d, r in sites_data]
        records.append(_attack_setting(plan, config, global_params, datas, victim_rows[:setting.batch_size], setting,
                                       attack, algorithms, low, high, prior_image, i))
    pictures = [r.pop("_pictures") for r in records]
    doc = {
        "audit": "leakage",
        "dataset": federation.name,
        "attribution": federation.attribution,
        "model": config.model,
        "model_options": dict(plan.model.options),
        "site": train[victim].name,
        "secure_aggregation_sites": [train[j].name for j in group],
        "rounds_before_attack": rounds,
        "training": {"lr": plan.local.lr, "l2": plan.local.l2, "optimizer": plan.model.options.get("optimizer")},
        "attack": {
            "labels": ("iDLG (Zhao et al., 2020): sign (binary) or argmax (multiclass) of the head bias' update, "
                       "at one image; else optimized (DLG)"),
            "images": "Inverting gradients (Geiping et al., 2020): cosine similarity of the simulated local "
                      "update + total variation, Adam on signed gradients",
            "local_steps": "simulated (Geiping's multi-step variant), as SGD steps",
            "objective_parameters": "the body's trainable parameters in view (the head gives the labels)",
            "steps": attack.steps, "tv": attack.tv, "lr": ATTACK_LR,
        },
        "dp": f"site clips to {attack.clip:g}, noise std noise_multiplier x {attack.clip:g} added before the server "
              "sees the upload (on the sum under secure aggregation)",
        "clip": attack.clip,
        "sweep": how,
        "metrics": ("PSNR and SSIM (scikit-image) on the standardized images, data range = max - min of the site's "
                    f"training images ({high - low:.4g}); originals matched to reconstructions by the best "
                    "assignment on PSNR; baseline = the attack's random start; prior = the mean training image "
                    "of the other sites, a guess that needs no upload"),
        "data_range": [low, high],
        "seed": config.seed,
        "notes": notes,
        "config": config.model_dump(mode="json"),
        "versions": package_versions(),
        "runtime_s": time.perf_counter() - started,
        "records": records,
    }
    doc["_pictures"] = pictures
    return doc


def worst_setting(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The record with the highest mean PSNR: the one a pre-flight check names."""
    return max(doc["records"], key=lambda r: r["psnr"], default=None)


# --------------------------------------------------------------------------- reports

HEADER = ["Batch", "Steps", "Noise", "Sharing", "SecAgg", "PSNR", "SSIM", "Rand", "Prior", "Labels"]


def table_cells(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header and rows the screen and Markdown tables show (PSNR in dB; Rand: the random
    start's PSNR; Prior: the other sites' mean image's; Labels: the share recovered)."""
    rows = [[str(r["batch_size"]), str(r["local_steps"]), f"{r['noise_multiplier']:g}", r["sharing"],
             "on" if r["secure_aggregation"] else "off", f"{r['psnr']:.2f}", f"{r['ssim']:.3f}",
             f"{r['baseline_psnr']:.2f}", "-" if r["prior_psnr"] is None else f"{r['prior_psnr']:.2f}",
             f"{r['label_accuracy']:.2f}"] for r in doc["records"]]
    return HEADER, rows


def leakage_markdown(doc: dict[str, Any]) -> str:
    header, rows = table_cells(doc)
    caption = (f"Gradient inversion of site {doc['site']}'s upload ({doc['model']}, after "
               f"{doc['rounds_before_attack']} FedAvg round(s)). Labels: {doc['attack']['labels']}. Images: "
               f"{doc['attack']['images']}, {doc['attack']['steps']} steps, TV weight {doc['attack']['tv']:g}. "
               f"DP: {doc['dp']}. Metrics: {doc['metrics']}. Settings: {doc['sweep']}. Seed {doc['seed']}. "
               "One attack with a fixed budget: a lower bound on leakage, not a proof of privacy.")
    lines = [f"# Leakage audit: {doc['dataset']}, site {doc['site']}", "", caption, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *[f"- {n}" for n in doc["notes"]]] if doc["notes"] else []
    if doc.get("attribution"):
        lines += ["", f"Data: {doc['attribution']}"]
    return "\n".join(lines) + "\n"


def leakage_csv(doc: dict[str, Any]) -> str:
    """One line per setting and image."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = ["batch_size", "local_steps", "noise_multiplier", "sharing", "secure_aggregation", "label_rule",
            "label_accuracy", "psnr", "ssim", "baseline_psnr", "prior_psnr", "prior_ssim"]
    writer.writerow([*keys, "image_row", "label", "recovered_label", "image_psnr", "image_ssim", "image_baseline_psnr"])
    for r in doc["records"]:
        for im in r["images"]:
            writer.writerow([*(repr(r[k]) if isinstance(r[k], float) else "" if r[k] is None else r[k] for k in keys),
                             im["row"], im["label"],
                             im["recovered_label"], repr(im["psnr"]), repr(im["ssim"]), repr(im["baseline_psnr"])])
    return buf.getvalue()


def leakage_figure(doc: dict[str, Any], pictures):
    """A row per setting: original | reconstruction for up to ``GRID_IMAGES`` images, each
    reconstruction titled with its PSNR and SSIM, the setting on the left."""
    from medfed.experiments.plots import _figure

    low, high = doc["data_range"]
    cols = 2 * max(len(p[0]) for p in pictures)
    fig = _figure(figsize=(1.3 * cols + 1.6, 1.45 * len(pictures) + 0.4), layout="constrained")
    axes = fig.subplots(len(pictures), cols, squeeze=False)
    for i, (record, (originals, recs)) in enumerate(zip(doc["records"], pictures)):
        for j in range(cols // 2):
            for k, ax in enumerate(axes[i, 2 * j:2 * j + 2]):
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(originals):
                    ax.set_axis_off()
                    continue
                ax.imshow((originals if k == 0 else recs)[j][0], cmap="gray", vmin=low, vmax=high)
                im = record["images"][j]
                ax.set_title("original" if k == 0 else f"{im['psnr']:.1f} dB, {im['ssim']:.2f}", fontsize=6)
        axes[i, 0].set_ylabel(f"B{record['batch_size']} S{record['local_steps']} z{record['noise_multiplier']:g}\n"
                              f"{record['sharing']}, secagg {'on' if record['secure_aggregation'] else 'off'}",
                              fontsize=6)
    fig.suptitle(f"{doc['dataset']}, site {doc['site']}: original | reconstruction (PSNR, SSIM)", fontsize=8)
    return fig


def leakage_files(doc: dict[str, Any]) -> dict[str, Callable[[], bytes]]:
    """The audit's files (json, csv, md, png) as producers of their bytes."""
    pictures = doc.get("_pictures")
    public = {k: v for k, v in doc.items() if k != "_pictures"}
    files = {
        "leakage.json": lambda: (json.dumps(public, indent=2, allow_nan=False) + "\n").encode(),
        "leakage.csv": lambda: leakage_csv(public).encode(),
        "leakage.md": lambda: leakage_markdown(public).encode(),
        "leakage.png": None,
    }
    if pictures is None:  # the names only (what an output folder owns)
        return files
    from medfed.experiments.plots import _render

    files["leakage.png"] = lambda: _render(leakage_figure(public, pictures), "png")
    return files
