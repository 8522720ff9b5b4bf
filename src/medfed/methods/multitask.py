"""Federated multi-task learning (survey §3.2.2 (2)): sites solve related tasks with one shared
encoder and a task-specific head kept at each site.

Smith et al. (2017, MOCHA) frame federated learning as multi-task learning, one task per site;
Huang et al. (2022b) train ADHD, ASD and schizophrenia classifiers on MRI at different sites,
federating the encoders into a global encoder while each site keeps its own classifier. Here
each site's labels may be a different target (``--label-column-site SITE=COL`` for tables,
``mni-phantom`` ``task=multitask``; the targets are recorded as ``site_targets``), all of one
task kind, so the head's shape is the same everywhere and only its meaning differs.

The machinery is FedPer's (:func:`medfed.methods.images.fedper`): the head (or a U-Net's
decoder) never leaves its site, the encoder is averaged as in FedAvg. With one task for every
site it is FedPer exactly. Departure from MOCHA: its learned task-relationship matrix (the
bi-convex alternation that couples the sites' models) is not implemented, because it needs
every site's head at the server, and this method keeps the heads at the sites.

Importing this module does not load torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medfed.engine.loop import FederatedAlgorithm
from medfed.methods.images import FAMILY, PRIVATE_PARTS, fedper
from medfed.methods.method import BuildContext, Method, Training
from medfed.methods.options import choice


def multitask(private: str = "head") -> FederatedAlgorithm:
    """Federated multi-task learning (Smith et al., 2017; Huang et al., 2022b): the shared encoder
    is averaged, each site's ``private`` part (its task's head, or a U-Net's decoder) stays with it."""
    return fedper(private, name="multitask")


def _build(opts: Mapping[str, Any], training: Training, context: BuildContext) -> FederatedAlgorithm:
    return multitask(opts["private"])


MULTITASK = Method(
    "multitask", "MultiTask", "federated",
    "sites with different targets (--label-column-site, mni-phantom task=multitask) share an averaged encoder; "
    "each keeps its own task head private. With one task it is FedPer",
    "Smith et al., 2017; Huang et al., 2022b", build=_build,
    options=(choice("private", "head", tuple(PRIVATE_PARTS),
                    "what stays at each site: its task head, or a U-Net's decoder (up blocks and head)"),),
    uploads="delta", personal=True, global_model=False, family=FAMILY,
)
