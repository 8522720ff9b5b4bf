"""Distillation from a teacher model (Kumar et al., 2021a; the loss of Hinton et al., 2015).

Each round a site scores its own training rows with the teacher it holds (the teacher's logits
never leave the site, and nothing of the teacher is uploaded), softens them at temperature ``T``
and runs its local steps on ``(1 - lam) CE + lam T² KL(teacher^T || student^T)``
(:mod:`medfed.models.distill`), the same batch draws as FedAvg's client; ``lam = 0`` is FedAvg's
client to the bit. The student is the study's model, numpy (logistic/softmax) or torch (through
its head's loss). With ``unlabeled`` (and ``lam > 0``) the site's unlabeled rows join its training
rows with the soft term alone (batches are drawn over both); without unlabeled rows nothing changes.
The teacher is fixed and so are the site's rows, so its softened outputs are computed at the site's
first round and kept in its client state (:class:`TeacherTargets`), not recomputed every round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfed.client.local import LocalData, LocalTraining, delta_upload, sgd_steps
from medfed.client.upload import Upload
from medfed.errors import ConfigError
from medfed.models.distill import UNLABELED, Distillation, pack, soften, student
from medfed.models.logistic import Params
from medfed.rng import KeyedRng
from medfed.wiretypes import wire_type


TEACHER_NEEDED = ("method 'distill' needs a teacher model: --teacher PATH, a file medfed run --save-model wrote "
                  "(models/<Setting>.npz), or [method_options.distill] teacher = PATH")


@dataclass(frozen=True)
class Teacher:
    """A trained classifier held at a site: its model object (None: a state dict, whose
    architecture is the student's), its parameter view and the file it came from (for messages)."""

    model: Any
    params: Params
    source: str

    def scores(self, X: np.ndarray, student_model: Any = None) -> np.ndarray:
        """The teacher's logits on rows preprocessed as the site trains on them: ``(n,)`` or ``(n, K)``;
        a state dict's through ``student_model`` (the study's model: its architecture and options)."""
        model = self.model if self.model is not None else student_model
        return np.asarray(model.decision(self.params, X), dtype=np.float64)


@wire_type
@dataclass(frozen=True)
class TeacherTargets:
    """A distilling site's client state: the teacher's softened probabilities on the rows it trains
    on (labeled, then unlabeled), ``(n,)`` or ``(n, K)``; they never leave the site."""

    soft: np.ndarray


def training_rows(data: LocalData, with_unlabeled: bool) -> tuple[np.ndarray, np.ndarray]:
    """The rows the site distills on and their labels: its labeled rows, then (``with_unlabeled``)
    its unlabeled ones, labeled :data:`~medfed.models.distill.UNLABELED`."""
    extra = data.X_unlabeled
    if not with_unlabeled or extra is None or len(extra) == 0:
        return data.X, np.asarray(data.y, dtype=np.float64)
    return (np.concatenate([data.X, np.asarray(extra, dtype=data.X.dtype)]),
            np.concatenate([np.asarray(data.y, dtype=np.float64), np.full(len(extra), UNLABELED)]))


def distill_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: TeacherTargets | None,
    rng: KeyedRng,
    *,
    teacher: Teacher | None,
    soft: Distillation,
    unlabeled: bool = True,
) -> tuple[Upload, TeacherTargets]:
    """The distilling client (module docstring). The upload counts the site's labeled rows and
    reports the distillation objective at the received model on the rows it trained on (at
    ``lam = 0``, the labeled rows' cross-entropy). A study without a teacher is refused before
    training (harness.check_teacher_study); a method built without one (as every method builds
    from its defaults) refuses here."""
    if teacher is None:
        raise ConfigError(TEACHER_NEEDED)
    X, y = training_rows(data, unlabeled and soft.weight > 0)  # at lam = 0 they would only dilute the batches
    if not isinstance(state, TeacherTargets) or len(state.soft) != len(X):
        state = TeacherTargets(soften(teacher.scores(X, config.model), soft.temperature))
    targets = pack(y, state.soft)
    local = dataclasses.replace(config, model=student(config.model, soft))
    trained, loss = sgd_steps(global_params, dataclasses.replace(data, X=X, y=targets), local, rng)
    return delta_upload(data, trained, global_params, loss), state
