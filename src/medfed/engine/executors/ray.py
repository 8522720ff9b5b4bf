"""Sites as Ray actors: a simulation that outgrows one machine runs on an existing Ray cluster.

Each actor owns a group of sites (:class:`~medfed.engine.executors.groups.SiteGroup`): their
rows, shipped to it once through Ray's object store when it starts, and their state, which
stays with the actor between rounds exactly as a site's stays with its process under the
``process`` executor. The coordinator sends plans and decisions; uploads come back. Requests to
different actors run at once; an actor answers its own sites one after another. Randomness is
keyed by site name, so grouping and placement change no number.

Without an address a Ray instance is started on this machine (``address="local"``, no
dashboard); ``--ray-address ADDR`` (``ray_address``) connects to a running cluster instead,
whose nodes must have medfed installed. Ray stays connected until the process ends (Ray shuts
it down at exit), so a study's many runs share one start; ``close`` ends this run's actors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfed.client.local import LocalData
from medfed.engine.executors.groups import GroupedExecutor, SiteGroup, reply_of, site_groups
from medfed.engine.faults import Faults
from medfed.engine.protocol import SiteProgram
from medfed.errors import ConfigError
from medfed.rng import KeyedRng


class SiteActor:
    """One Ray actor's state: the sites it owns, built from rows it received once."""

    def __init__(self, program: SiteProgram, sites: list[LocalData], rng: KeyedRng, state_dir: Path | None) -> None:
        self.group = SiteGroup.of(program, sites, rng, state_dir)

    def answer(self, request: str, args: Any) -> tuple[str, Any]:
        return self.group.answer(request, args)


def check_ray(address: str | None) -> None:
    """What a study on executor ``ray`` needs before anything trains: Ray installed, and a
    cluster listening at ``address`` when one is given."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError("executor 'ray' needs Ray: pip install 'medfed[scale]' (or 'ray>=2.9')")
    if address:
        check_reachable(address)


def connect(address: str | None) -> Any:
    """The ``ray`` module, connected: to ``address``, or to a Ray started here for this process."""
    check_ray(address)  # installed, and something listens at the address, even when this process is connected
    import ray

    if not ray.is_initialized():
        refused = getattr(ray.exceptions, "AuthenticationError", None)  # Ray >= 2.52's token authentication
        try:
            ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, *((refused,) if refused else ())) as exc:
            if _token_refused(exc, refused):
                raise ConfigError(
                    f"--ray-address {address!r}: the cluster refused this process's token (Ray's token "
                    "authentication): set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN "
                    "(or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)") from None
            raise ConfigError(f"--ray-address {address!r}: no Ray cluster answers there ({exc})") from None
    return ray


def _token_refused(exc: BaseException, kind: type | None) -> bool:
    """Whether Ray's token authentication refused us: ``exc`` or an exception it was raised from
    (its cause or context chain) is a ``kind`` (``ray.exceptions.AuthenticationError``) or, as
    when the GCS client's error comes back as text inside a RuntimeError, names InvalidAuthToken."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if (kind is not None and isinstance(exc, kind)) or "InvalidAuthToken" in str(exc):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a ``HOST:PORT`` (or ``ray://HOST:PORT``) where nothing listens, in one line: Ray
    itself retries an unreachable cluster for minutes before it fails. ``auto`` and other forms
    are left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError(f"--ray-address {address!r}: no Ray cluster answers there ({exc})") from None


class RayExecutor(GroupedExecutor):
    def __init__(
        self,
        program: SiteProgram,
        sites: Sequence[LocalData],
        rng: KeyedRng,
        *,
        faults: Faults | None = None,
        state_dir: Path | None = None,
        workers: int | None = None,
        address: str | None = None,
    ) -> None:
        ray = self._ray = connect(address)
        if workers is None:  # one actor per CPU of the cluster: more would only queue
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        groups = site_groups(sites, workers)
        super().__init__(sites, groups, faults)
        actor = ray.remote(num_cpus=1)(SiteActor)
        shared = ray.put(program), ray.put(rng)  # one copy in the object store for every actor
        self._actors = [actor.remote(shared[0], group, shared[1], state_dir) for group in groups]

    def _ask(self, request: str, per_worker: Mapping[int, Any]) -> dict[int, Any]:
        refs = {w: self._actors[w].answer.remote(request, args) for w, args in per_worker.items()}
        replies = self._ray.get(list(refs.values()))
        return {w: reply_of(reply) for w, reply in zip(refs, replies)}

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
