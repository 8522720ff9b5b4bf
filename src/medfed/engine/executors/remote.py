"""Sites reached through messages: the executor of a deployment.

A *link* moves opaque bytes to named sites and their answers back (on Flower's runtime:
:class:`medfed.deploy.link.FlowerLink`; in tests, a function that calls the sites in this
process). This executor turns the protocol's requests into :mod:`medfed.comm.wire` bytes and
the answers back into uploads; a site that does not answer in time, crashes or sends
something that is not its upload becomes a reason in the round's ``missing``, never a
stopped federation.

The coordinator's decision on each upload (keep the site's new state or not) travels with
the next request to that site, so it costs no extra round trip; the site's runtime applies
it before anything else (:meth:`medfed.engine.runtime.SiteRuntime.commit`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from medfed.client.upload import Upload
from medfed.comm.secure import SecureReady
from medfed.comm.wire import WireError, decode, encode
from medfed.engine.protocol import Params, RoundPlan, SiteSetup


class Link(Protocol):
    def exchange(self, requests: Mapping[str, bytes], timeout_s: float) -> dict[str, bytes | str]:
        """Send each site its bytes; its answer, or why none came (a str), within ``timeout_s``."""
        ...


def plan_fields(plan: RoundPlan) -> dict[str, Any]:
    return {"round": plan.round, "cohort": list(plan.cohort), "params": plan.params, "message": plan.message,
            "final": plan.final}


def plan_of(fields: Mapping[str, Any]) -> RoundPlan:
    return RoundPlan(int(fields["round"]), tuple(fields["cohort"]), dict(fields["params"]),
                     dict(fields["message"]), bool(fields["final"]))


class RemoteExecutor:
    """The protocol over a :class:`Link`. ``run`` is what every request carries so that a site
    can rebuild the method's site program on its own (the method's name and options, the
    setup exchange's context); this executor does not read it."""

    def __init__(self, link: Link, sites: Sequence[str], run: Mapping[str, Any], timeout_s: float,
                 setup: Mapping[str, SiteSetup] | None = None) -> None:
        self.link = link
        self.sites = tuple(sites)
        self.run = dict(run)
        self.timeout_s = timeout_s
        self._setup = dict(setup or {})
        self._decisions: dict[str, tuple[int, bool]] = {}  # site -> its last upload's fate, still to tell it

    def _ask(self, op: str, names: Sequence[str], fields: Mapping[str, Any],
             own: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Send ``op`` to ``names`` (with ``own[site]``'s fields too); decoded answers, or a
        reason string per site."""
        requests = {
            site: encode({"op": op, "run": self.run, "commit": self._decisions.get(site), **fields,
                          **(own or {}).get(site, {})})
            for site in names
        }
        answers = self.link.exchange(requests, self.timeout_s)
        out: dict[str, Any] = {}
        for site in names:
            raw = answers.get(site, "no answer")
            if isinstance(raw, str):
                out[site] = raw
                continue
            self._decisions.pop(site, None)  # the site has heard it
            try:
                reply = decode(raw, f"the answer of site {site!r}")
            except WireError as exc:
                out[site] = f"malformed answer: {exc}"
                continue
            if isinstance(reply, Mapping) and "error" in reply:
                out[site] = f"site error: {reply['error']}"
            else:
                out[site] = reply
        return out

    def setup(self) -> dict[str, SiteSetup]:
        return dict(self._setup)

    def train(self, plan: RoundPlan) -> dict[str, Upload | str]:
        answers = self._ask("train", plan.cohort, {"plan": plan_fields(plan)})
        out: dict[str, Upload | str] = {}
        for site in plan.cohort:  # cohort order, as every executor answers
            reply = answers[site]
            if isinstance(reply, (Upload, SecureReady)) and reply.site == site:
                out[site] = reply
            elif isinstance(reply, str):
                out[site] = reply
            else:
                out[site] = f"malformed answer: expected the site's upload, got {type(reply).__name__}"
        return out

    def stage(self, name: str, round_: int, messages: Mapping[str, Any]) -> dict[str, Any]:
        """A protocol stage (secure aggregation's share, mask, unmask): each site its own message;
        the site's runtime answers it (:meth:`medfed.engine.runtime.SiteRuntime.stage`)."""
        return self._ask("stage", list(messages), {"stage": name, "round": round_},
                         {site: {"message": m} for site, m in messages.items()})

    def commit(self, round_: int, decisions: Mapping[str, bool]) -> None:
        self._decisions.update((site, (round_, accepted)) for site, accepted in decisions.items())

    def evaluate(self, plan: RoundPlan, **fields: Any) -> dict[str, Any]:
        """Each site evaluates the final model(s) on its own test rows and answers with metrics."""
        return self._ask("evaluate", plan.cohort, {"plan": plan_fields(plan), **fields})

    def personalize(self, plan: RoundPlan) -> dict[str, Params]:
        return {}  # personal models stay at their sites; they report metrics through evaluate()

    def site_states(self) -> dict[str, Any]:
        return {}  # the coordinator never holds a site's state

    def close(self) -> None:
        pass
