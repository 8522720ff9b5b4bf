"""Data layer: sites and federations, table loaders, scaling, embedded data sets."""

from medfed.data.federation import Federation, Site

__all__ = ["Federation", "Site"]
