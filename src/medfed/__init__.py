"""medfed: federated learning for medical image analysis.

Implements the client-server round of Guan and Liu's survey (§2.3), its methods (§3) and
its experiment (§6). The layers, from the bottom up, are ``data``, ``models``, ``client``,
``comm``, ``server``, ``engine``, ``experiments`` and ``cli``; imports point down only.
"""

__version__ = "0.1.0"
