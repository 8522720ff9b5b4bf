"""Secure aggregation cost: one SecAgg+ round (medfed.comm.secagg) against the plain float64 sum, same run.

For K sites and n parameters, a round runs every party message by message with the per-party
functions a deployment calls (advertise, share, route, mask, unmask request, unmask, sum),
one party after another in this process, and counts the bytes of every message as
medfed.comm.wire encodes it, in both directions. The plain round is what the channel does
without masking: each site's float64 vector to wire bytes, decoded at the server and summed.
Plain and secure rounds are timed in interleaved pairs (alternating which goes first) and
the median of each is printed. The global model's broadcast is the same in both, so it is
left out of the bytes.

Expansion factor = bytes a site sends in a secure round / raw bytes of its 64-bit input (8·n);
the plain wire's own factor is printed next to it.
Run: python benchmarks/bench_secagg.py [--sites 10,50,100] [--params 10000,100000] [--pairs 3] [--drop 0.0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from medfed.comm import secagg as sa
from medfed.comm import wire

_NBYTES = len  # what crossed the network: the message's wire bytes


def plain_round(xs: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    wires = {s: wire.encode(x) for s, x in xs.items()}
    total = np.zeros_like(next(iter(xs.values())))
    for data in wires.values():
        total += wire.decode(data)
    return total, sum(map(_NBYTES, wires.values()))


def secure_round(xs: dict[str, np.ndarray], drop: set[str]) -> tuple[np.ndarray, dict[str, float]]:
    """One round, every message through wire bytes; returns the sum and its costs."""
    n = len(next(iter(xs.values())))
    params = sa.secagg_params(xs, clip_range=1.0, length=n, graph_seed=0)
    graph = sa.neighbours(params)
    up = dict.fromkeys(xs, 0)  # bytes each site sends
    down = dict.fromkeys(xs, 0)  # bytes each site receives
    site_s = dict.fromkeys(xs, 0.0)
    server_s = 0.0

    def send(site, message):
        data = wire.encode(message)
        up[site] += _NBYTES(data)
        return wire.decode(data)

    def deliver(site, message):
        data = wire.encode(message)
        down[site] += _NBYTES(data)
        return wire.decode(data)

    def at_site(site, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        site_s[site] += time.perf_counter() - start
        return out

    secrets, adverts = {}, {}
    for s in params.sites:
        secrets[s], advert = at_site(s, sa.advertise, params, s)
        adverts[s] = send(s, advert)
    theirs = {s: {j: deliver(s, adverts[j]) for j in graph[s]} for s in params.sites}
    sealed = {s: tuple(send(s, b) for b in at_site(s, sa.share, params, secrets[s], theirs[s])) for s in params.sites}
    start = time.perf_counter()
    routed = sa.route_shares(params, sealed)
    server_s += time.perf_counter() - start
    held, masked = {}, {}
    for s in params.sites:
        boxes = [deliver(s, b) for b in routed[s]]
        held[s], y = at_site(s, sa.mask, params, secrets[s], theirs[s], boxes, xs[s])
        if s not in drop:
            masked[s] = send(s, y)
    start = time.perf_counter()
    request = sa.unmask_request(params, masked)
    server_s += time.perf_counter() - start
    responses = {}
    for s in request.arrived:
        responses[s] = send(s, at_site(s, sa.unmask, params, held[s], deliver(s, request)))
    start = time.perf_counter()
    result = sa.unmask_sum(params, adverts, masked, responses)
    server_s += time.perf_counter() - start
    senders = [s for s in params.sites if s not in drop]
    cost = {
        "site_s_mean": statistics.fmean(site_s[s] for s in senders),
        "server_s": server_s,
        "round_s": sum(site_s.values()) + server_s,
        "up_bytes_per_site": statistics.fmean(up[s] for s in senders),
        "down_bytes_per_site": statistics.fmean(down[s] for s in senders),
        "total_bytes": sum(up.values()) + sum(down.values()),
        "degree": params.degree,
        "threshold": params.threshold,
    }
    return result.total, cost


def measure(k: int, n: int, pairs: int, drop_fraction: float) -> dict:
    rng = np.random.default_rng(k * 1_000_003 + n)
    xs = {f"site-{i:03d}": rng.uniform(-1, 1, n) for i in range(k)}
    # drop every m-th site after masking (spread over the ring order by name, not by neighbourhood)
    every = round(1 / drop_fraction) if drop_fraction else 0
    drop = {s for i, s in enumerate(sorted(xs)) if every and i % every == every - 1}
    kept = {s: x for s, x in xs.items() if s not in drop}
    plain_s, secure_s, costs = [], [], []
    for p in range(pairs):
        order = ("plain", "secure") if p % 2 == 0 else ("secure", "plain")
        for which in order:
            start = time.perf_counter()
            if which == "plain":
                plain_total, plain_bytes = plain_round(kept)
                plain_s.append(time.perf_counter() - start)
            else:
                secure_total, cost = secure_round(xs, drop)
                secure_s.append(time.perf_counter() - start)
                costs.append(cost)
    err = float(np.max(np.abs(secure_total - plain_total)))
    cost = {key: statistics.median(c[key] for c in costs) for key in costs[0]}
    raw = 8 * n
    return {
        "sites": k,
        "params": n,
        "dropped": len(drop),
        "degree": int(cost["degree"]),
        "threshold": int(cost["threshold"]),
        "plain_round_s": statistics.median(plain_s),
        "secure_round_s": statistics.median(secure_s),
        "secure_site_s": cost["site_s_mean"],
        "secure_server_s": cost["server_s"],
        "time_ratio": statistics.median(secure_s) / statistics.median(plain_s),
        "plain_bytes_per_site": plain_bytes / len(kept),
        "secure_up_bytes_per_site": cost["up_bytes_per_site"],
        "secure_down_bytes_per_site": cost["down_bytes_per_site"],
        "expansion_up": cost["up_bytes_per_site"] / raw,
        "expansion_up_and_down": (cost["up_bytes_per_site"] + cost["down_bytes_per_site"]) / raw,
        "plain_expansion": plain_bytes / len(kept) / raw,
        "max_abs_diff_vs_plain": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="10,50,100")
    parser.add_argument("--params", default="10000,100000")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--drop", type=float, default=0.0, help="fraction of sites that drop after masking")
    parser.add_argument("--json", action="store_true", help="print one JSON record per line")
    args = parser.parse_args()
    head = f"{'K':>4} {'n':>7} {'k':>3} {'t':>3} {'drop':>4} {'plain s':>9} {'secure s':>9} {'site s':>8} {'server s':>8} {'x time':>8} {'up/site B':>10} {'down/site B':>11} {'exp up':>7} {'exp u+d':>7} {'plain':>6} {'|diff|':>8}"
    if not args.json:
        print(head)
    for k in map(int, args.sites.split(",")):
        for n in map(int, args.params.split(",")):
            r = measure(k, n, args.pairs, args.drop)
            if args.json:
                print(json.dumps(r))
                continue
            print(
                f"{k:>4} {n:>7} {r['degree']:>3} {r['threshold']:>3} {r['dropped']:>4} {r['plain_round_s']:>9.5f} "
                f"{r['secure_round_s']:>9.3f} {r['secure_site_s']:>8.4f} {r['secure_server_s']:>8.3f} "
                f"{r['time_ratio']:>8.0f} {r['secure_up_bytes_per_site']:>10.0f} {r['secure_down_bytes_per_site']:>11.0f} "
                f"{r['expansion_up']:>7.4f} {r['expansion_up_and_down']:>7.4f} {r['plain_expansion']:>6.4f} "
                f"{r['max_abs_diff_vs_plain']:>8.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
