"""Contrastive self-supervised pretraining of the encoder at a site (SimCLR, Chen et al., 2020).

Each local step takes a mini-batch of the site's rows, labeled and unlabeled alike, draws two
augmented views of it (:func:`medfed.client.semisupervised.augment`: flip, intensity jitter and
a shift for images; Gaussian feature noise for tables, no masking), passes both through the network's encoder
(:meth:`~medfed.models.torch_models.Network.embed`, everything before ``head.*``) and a small
projection head ``Linear -> ReLU -> Linear``, and descends NT-Xent (:func:`nt_xent`). The
projection head is the site's client state: it never leaves the site. The upload is the
encoder's delta only: no ``head.*`` (untrained here) and no projection parameter.

Torch models with an encoder only (cnn2d, cnn3d, mlp); the numpy models have no encoder to
pretrain and ``torch_logistic`` none either. Plain SGD steps at the training's ``lr`` (SimCLR:
LARS with large batches; a site here has a few hundred rows).
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from medfed.client.local import LocalData, LocalTraining, batch_indices
from medfed.client.semisupervised import augment
from medfed.client.upload import Upload
from medfed.errors import ConfigError
from medfed.models.logistic import Params
from medfed.models.registry import is_head
from medfed.rng import KeyedRng, name_key
from medfed.wiretypes import wire_type

VIEW_STREAM, PROJECTION_STREAM = name_key("contrastive/views"), name_key("contrastive/projection")


@wire_type
@dataclasses.dataclass(frozen=True)
class ProjectionState:
    """A site's projection head (``w1, b1, w2, b2``), kept at the site between rounds."""

    params: dict[str, np.ndarray]


def nt_xent(z1, z2, temperature: float):
    """NT-Xent (Chen et al., 2020) of two views' projections ``(n, d)`` each: row i of ``z1`` and
    of ``z2`` are a positive pair, the other 2n - 2 rows its negatives; cosine similarities over
    ``temperature``, mean cross-entropy over all 2n anchors (a torch scalar)."""
    import torch
    import torch.nn.functional as F

    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, positives)


def encoder_names(model, params: Params) -> list[str]:
    """The encoder's parameters (all but ``head.*``); a ConfigError for a model without one."""
    names = [k for k in params if not is_head(k)]
    if not hasattr(model, "network") or not names:
        raise ConfigError(f"method 'contrastive' pretrains a torch model's encoder; model "
                          f"{getattr(model, 'name', '?')!r} has none: use cnn2d, cnn3d or mlp")
    return names


def _init_projection(width: int, dim: int, gen: np.random.Generator) -> dict[str, np.ndarray]:
    """He-normal weights, zero biases (as the model's own body is initialized)."""
    return {"w1": gen.standard_normal((dim, width)) * np.sqrt(2.0 / width), "b1": np.zeros(dim),
            "w2": gen.standard_normal((dim, dim)) * np.sqrt(2.0 / dim), "b2": np.zeros(dim)}


def contrastive_pretrain_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: ProjectionState | None,
    rng: KeyedRng,
    *,
    temperature: float,
    projection: int,
    noise: float,
    lr: float | None = None,
) -> tuple[Upload, ProjectionState]:
    """One round of pretraining (module docstring): ``config.steps`` NT-Xent steps of size ``lr``
    (None: ``config.lr``) over the site's rows; uploads the encoder's delta, weighted by all its rows, with the mean NT-Xent
    of the steps' batches as its loss; keeps the projection head. torch runs under the model's
    ``threads`` option, as the model's own training does."""
    limit = getattr(config.model, "thread_limit", None)  # a numpy model is refused inside, by name
    with limit() if limit is not None else contextlib.nullcontext():
        return _pretrain_round(global_params, data, config, state, rng, temperature, projection, noise, lr)


def _pretrain_round(global_params, data, config, state, rng, temperature, projection, noise, lr):
    import torch
    import torch.nn.functional as F

    model = config.model
    names = encoder_names(model, global_params)
    rows = np.asarray(data.X, dtype=np.float64)
    if data.X_unlabeled is not None and len(data.X_unlabeled):
        rows = np.concatenate([rows, np.asarray(data.X_unlabeled, dtype=np.float64)])
    if len(rows) < 2:
        raise ConfigError(f"method 'contrastive': site {data.name!r} has {len(rows)} row; NT-Xent needs 2 or more")
    net = model.network(rows.shape[1:]).to(device=model.device, dtype=model.dtype)
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in global_params.items()}, strict=False)
    net.eval()  # the features' width, without moving BatchNorm's running statistics
    with torch.no_grad():
        width = int(net.embed(torch.as_tensor(rows[:1], dtype=model.dtype, device=model.device)).shape[1])
    net.train()
    own = state.params if state is not None else _init_projection(
        width, projection, rng.child(PROJECTION_STREAM).generator)
    proj = {k: torch.tensor(v, dtype=model.dtype, device=model.device, requires_grad=True) for k, v in own.items()}
    trainable = list(net.parameters()) + list(proj.values())  # the head gets no gradient: left as it was
    views = rng.child(VIEW_STREAM).generator
    step = config.lr if lr is None else lr
    losses = []
    batch = config.batch_size if config.batch_size is not None and config.batch_size >= 2 else None
    for idx in batch_indices(len(rows), batch, config.steps, rng):
        xb = rows if idx is None else rows[idx]
        pair = [torch.as_tensor(augment(xb, noise, views, translate=xb.ndim > 2), dtype=model.dtype, device=model.device)
                for _ in range(2)]
        z1, z2 = (F.linear(F.relu(F.linear(net.embed(v), proj["w1"], proj["b1"])), proj["w2"], proj["b2"])
                  for v in pair)
        loss = nt_xent(z1, z2, temperature)
        grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(trainable, grads):
                if g is not None:
                    p -= step * g
        losses.append(float(loss.detach()))
    trained = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in net.state_dict().items()}
    delta = {k: trained[k] - np.asarray(global_params[k], dtype=np.float64) for k in names}
    kept = ProjectionState({k: v.detach().cpu().numpy().astype(np.float64) for k, v in proj.items()})
    return Upload(data.name, delta, len(rows), "delta", {"loss": float(np.mean(losses))}), kept


ENCODER_MODELS = ("cnn2d", "cnn3d", "mlp")  # torch networks with a body before a per-sample head


def pretraining_refusal(model: str) -> str | None:
    """Why the model called ``model`` cannot be pretrained contrastively (None: it can)."""
    if model not in ENCODER_MODELS:
        return f"model {model!r} has no encoder before a per-sample head (those that do: {', '.join(ENCODER_MODELS)})"
    return None
