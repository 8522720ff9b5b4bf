"""The coordinator's view of the federation inside medfed's ServerApp: which node is which
site, and one exchange of opaque bytes with a set of sites, over Flower's Grid API.

Flower's ``grid.send_and_receive`` sleeps 3 s between pulls; :class:`FlowerLink` pushes
every request at once and pulls the replies every ``poll_s`` (a pull is one HTTPS request
to the SuperLink, about a millisecond on loopback), so a round waits for its slowest site
and not for a poll interval. A site that does not answer in time, or answers with an
error, is a reason (a str), never an exception: the coordinator decides what a round
without it means (``min_sites``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Mapping, Sequence

from medfed.deploy.flower_patches import PULL_FUNCTIONS, quick_object_retries_in

LOG = logging.getLogger("medfed.deploy")
# Flower routes a message to the ClientApp function registered for its type
SITE_QUERY = "query.medfed_site"
EXCHANGE = "train.medfed_exchange"
RECORD = "medfed"
PAYLOAD = "payload"


def payload_content(payload: bytes):
    """A RecordDict carrying ``payload`` unchanged: one uint8 Array, which Flower sends in
    chunks (5 MiB each), so a large model needs no special case."""
    from flwr.app import Array, ArrayRecord, RecordDict

    array = Array(dtype="uint8", shape=(len(payload),), stype="medfed.bytes", data=bytes(payload))
    return RecordDict({RECORD: ArrayRecord({PAYLOAD: array})})


def payload_of(message) -> bytes:
    """The bytes :func:`payload_content` put in ``message``; KeyError when there are none."""
    return message.content.array_records[RECORD][PAYLOAD].data


def site_of(message) -> str:
    """The site name a node answered the site query with."""
    return str(message.content.config_records[RECORD]["site"])


class FlowerLink:
    """Send each site its bytes and collect the replies through a Flower ``Grid``.

    ``sites`` learns which node id is which site by asking the nodes (each SuperNode was
    started with ``--node-config site="NAME"``); ``exchange`` then addresses sites by name.
    """

    def __init__(self, grid, poll_s: float = 0.05, log: logging.Logger = LOG) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s!r}")
        self.grid = grid
        self.poll_s = float(poll_s)
        self.log = log
        self.nodes: dict[str, int] = {}
        self._exchanges = 0
        # seconds spent in Flower's Grid calls and waiting for replies: the rest of a round's
        # wall time is medfed's own work (what medfed adds on top of Flower)
        self.grid_s = 0.0
        self.wait_s = 0.0

    def _wait(self, deadline: float) -> None:
        start = time.monotonic()
        time.sleep(min(self.poll_s, max(0.0, deadline - start)))
        self.wait_s += time.monotonic() - start

    def _push(self, messages: list) -> list[str | None]:
        """The message id of each message, None where the SuperLink refused it (Flower's grid
        returns no ids at all when the request was too large)."""
        start = time.monotonic()
        ids = list(self.grid.push_messages(messages)) if messages else []
        self.grid_s += time.monotonic() - start
        return ids if len(ids) == len(messages) else [None] * len(messages)

    def _pull(self, message_ids: list[str]) -> list:
        # a reply seen before its objects are in would wait 1 s in Flower's grid: retry sooner
        module = sys.modules.get(type(self.grid).__module__)
        quick = module is not None and any(hasattr(module, f) for f in PULL_FUNCTIONS)
        start = time.monotonic()
        with quick_object_retries_in(module, self.poll_s) if quick else contextlib.nullcontext():
            replies = list(self.grid.pull_messages(message_ids))
        self.grid_s += time.monotonic() - start
        return replies

    def _collect(self, pending: dict[str, str], deadline: float) -> dict[str, object]:
        """Pull replies to the message ids in ``pending`` (id -> a label) until all came or
        the deadline passed; the reply messages by label."""
        replies: dict[str, object] = {}
        while pending:
            for reply in self._pull(list(pending)):
                label = pending.pop(reply.metadata.reply_to_message_id, None)
                if label is not None:
                    replies[label] = reply
            if not pending or time.monotonic() >= deadline:
                break
            self._wait(deadline)
        return replies

    def _registered_names(self) -> dict[int, str]:
        """Node id -> the name its key was registered under (medfed registers each site's
        key under the site's name); empty where the grid has no such record."""
        try:
            return {int(n.node_id): str(n.name) for n in self.grid.get_nodes() if n.name}
        except AttributeError:
            return {}

    def sites(self, expected: Sequence[str], timeout_s: float) -> dict[str, int]:
        """Site name -> node id for the ``expected`` sites that answered within ``timeout_s``.

        Nodes appearing while waiting are asked too. A node naming a site not expected, a
        second node naming a site already claimed, a node naming another site than the one
        its key was registered as (one hospital posing as another), or an error reply is
        logged and ignored; expected sites missing at the end are logged, and the caller
        decides.
        """
        from flwr.app import Message, RecordDict

        expected = list(expected)
        deadline = time.monotonic() + timeout_s
        asked: dict[str, int] = {}  # message id -> node id
        pending: dict[str, str] = {}
        found: dict[str, int] = {}
        registered: dict[int, str] = {}
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in asked.values()]
            if new:
                registered.update(self._registered_names())
                ttl = max(1.0, deadline - time.monotonic())
                messages = [Message(RecordDict(), n, SITE_QUERY, ttl=ttl, group_id="medfed-sites") for n in new]
                for node, mid in zip(new, self._push(messages), strict=True):
                    if mid is None:
                        self.log.warning("node %s: the SuperLink refused the site query", node)
                        continue
                    asked[mid] = node
                    pending[mid] = mid
            for mid, reply in self._collect(pending, min(deadline, time.monotonic() + self.poll_s)).items():
                node = asked[mid]
                if reply.has_error():
                    self.log.warning("node %s answered the site query with an error: %s", node, reply.error.reason)
                    continue
                try:
                    site = site_of(reply)
                except (KeyError, AttributeError):
                    self.log.warning("node %s answered the site query without a site name; ignored", node)
                    continue
                if registered.get(node) and registered[node] != site:
                    self.log.warning("node %s says it is site %r but its key was registered as %r; ignored",
                                     node, site, registered[node])
                elif site not in expected:
                    self.log.warning("node %s says it is site %r, which the study does not name; ignored", node, site)
                elif site in found:
                    self.log.warning("node %s also says it is site %r (node %s was first); ignored", node, site, found[site])
                else:
                    found[site] = node
                    self.log.info("site %r is node %s", site, node)
            if len(found) == len(expected) or time.monotonic() >= deadline:
                break
            if not pending:  # nothing in flight: wait before asking the SuperLink for new nodes
                self._wait(deadline)
        missing = [s for s in expected if s not in found]
        if missing:
            self.log.warning("no node answered as %s within %g s", ", ".join(map(repr, missing)), timeout_s)
        self.nodes.update(found)
        return found

    def exchange(self, requests: Mapping[str, bytes], timeout_s: float) -> dict[str, bytes | str]:
        """Send each site its bytes; each site's reply bytes, or the reason there are none
        (``"timeout after 30 s"``, ``"error: ..."``, ``"not connected"``)."""
        from flwr.app import Message

        self._exchanges += 1
        group = f"medfed-{self._exchanges}"
        deadline = time.monotonic() + timeout_s
        out: dict[str, bytes | str] = {}
        sites = [s for s in requests if s in self.nodes]
        for site in requests:
            if site not in self.nodes:
                out[site] = "not connected"
        # a reply after the deadline is no use: the SuperLink may drop the message then
        messages = [Message(payload_content(requests[s]), self.nodes[s], EXCHANGE, ttl=max(1.0, timeout_s),
                            group_id=group) for s in sites]
        pending = {}
        for site, mid in zip(sites, self._push(messages), strict=True):
            if mid is None:
                out[site] = "error: the SuperLink refused the message (too large, or an unknown node)"
            else:
                pending[mid] = site
        for site, reply in self._collect(pending, deadline).items():
            if reply.has_error():
                out[site] = f"error: {reply.error.reason} (code {reply.error.code})"
                continue
            try:
                out[site] = payload_of(reply)
            except (KeyError, AttributeError):
                out[site] = "error: the reply carries no payload"
        for site in pending.values():
            out[site] = f"timeout after {timeout_s:g} s"
        return {site: out[site] for site in requests}
