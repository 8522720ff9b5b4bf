"""Distillation from a teacher model (Kumar et al., 2021a; the loss of Hinton et al., 2015).

Each round a site scores its own training rows with the teacher it holds (the teacher's logits
never leave the site, and nothing of the teacher is uploaded), softens them at temperature ``T``
and runs its local steps on ``(1 - lam) CE + lam T² KL(teacher^T || student^T)``
(:mod:`medfed.models.distill`), the same batch draws as FedAvg's client; ``lam = 0`` is FedAvg's
client to the bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfed.client.local import LocalData, LocalTraining, delta_upload, sgd_steps
from medfed.client.upload import Upload
from medfed.errors import ConfigError
from medfed.models.distill import Distillation, Distilling, pack, soften
from medfed.models.logistic import Params
from medfed.rng import KeyedRng


TEACHER_NEEDED = ("method 'distill' needs a teacher model: --teacher PATH, a file medfed run --save-model wrote "
                  "(models/<Setting>.npz), or [method_options.distill] teacher = PATH")


@dataclass(frozen=True)
class Teacher:
    """A trained numpy classifier held at a site: its model object, its parameter view and the
    file it came from (for messages)."""

    model: Any
    params: Params
    source: str

    def scores(self, X: np.ndarray) -> np.ndarray:
        """The teacher's logits on rows preprocessed as the site trains on them: ``(n,)`` or ``(n, K)``."""
        return np.asarray(self.model.decision(self.params, X), dtype=np.float64)


def distill_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: Any,
    rng: KeyedRng,
    *,
    teacher: Teacher | None,
    soft: Distillation,
) -> tuple[Upload, Any]:
    """The distilling client (module docstring). The upload counts the site's labeled rows and
    reports the distillation objective at the received model (at ``lam = 0``, the cross-entropy).
    A study without a teacher is refused before training (harness.check_teacher_study); a method
    built without one (as every method builds from its defaults) refuses here."""
    if teacher is None:
        raise ConfigError(TEACHER_NEEDED)
    targets = pack(data.y, soften(teacher.scores(data.X), soft.temperature))
    student = dataclasses.replace(config, model=Distilling(config.model, soft))
    trained, loss = sgd_steps(global_params, dataclasses.replace(data, y=targets), student, rng)
    return delta_upload(data, trained, global_params, loss), state
