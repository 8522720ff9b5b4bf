"""Model families behind one parameter view: an ordered mapping ``name -> numpy array``."""

from medfed.models.logistic import LogisticRegression, Params

__all__ = ["LogisticRegression", "Params"]
