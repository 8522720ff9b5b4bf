"""A link whose sites answer in this process: a deployed study's logic without a network.

It calls :func:`medfed.deploy.site.handle` with each site's node config, exactly as a
SuperNode's ClientApp does, so every byte still goes through the wire codec and every site
still reads only its own file and folder. Tests use it for fast deployment checks; a
consortium can dry-run its ``STUDY.toml`` and site files with it before opening ports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from medfed.deploy.site import handle


class LoopbackLink:
    """``nodes``: site name -> its node config (``site``, ``data``, ``folder``). ``fail(site,
    request) -> reason | None`` may make a site miss a request (a crash, a timeout)."""

    def __init__(self, nodes: Mapping[str, Mapping[str, Any]],
                 fail: Callable[[str, bytes], str | None] | None = None) -> None:
        self.nodes = {site: dict(cfg) for site, cfg in nodes.items()}
        self.fail = fail

    def exchange(self, requests: Mapping[str, bytes], timeout_s: float) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        for site, payload in requests.items():
            if site not in self.nodes:
                out[site] = "not connected"
                continue
            reason = self.fail(site, payload) if self.fail else None
            out[site] = reason if reason is not None else handle(payload, self.nodes[site])
        return out
