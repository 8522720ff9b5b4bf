"""What one site sends after its local work: the only thing that ever leaves a site."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from medfed.wiretypes import wire_type

UploadKind = Literal["delta", "gradient", "params"]


@wire_type
@dataclass(frozen=True, slots=True)
class Upload:
    """One site's message to the server for one round.

    ``payload`` follows the parameter view (name -> array). ``kind`` says what it holds:
    ``delta`` (local model minus the global model it started from), ``gradient`` (of the
    site's loss at the global model) or ``params`` (the local model itself). ``metrics``
    are scalars the server may use (``loss``: the site's training loss at the global model
    it received). ``extras`` carries method-specific data (control variates, label counts).
    """

    site: str
    payload: dict[str, np.ndarray]
    n_examples: int
    kind: UploadKind
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the payload and of the extras' arrays (SCAFFOLD's control delta doubles what a
        site sends, and the communication report must show it); scalar metrics are not counted."""
        extras = 0
        for value in self.extras.values():
            for part in (value.values() if isinstance(value, Mapping) else (value,)):
                extras += np.asarray(part).nbytes
        return sum(a.nbytes for a in self.payload.values()) + extras
