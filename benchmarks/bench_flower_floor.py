"""Flower's own floor against medfed on Flower: start-up, seconds per round, memory.

Each variant is a fresh deployment on 127.0.0.1: a SuperLink and 3 SuperNodes as separate
processes, TLS and node authentication on, keys registered from code. The round is the
same everywhere: each site moves a float64 vector of 100 half-way to its own target and
the server averages (a bare FedAvg), so every variant must end on the same vector.

  flower-stock    stock SuperNodes; a bare Grid-API ServerApp using Flower's stock
                  ``grid.send_and_receive``; a plain Flower ClientApp
  medfed          stock SuperNodes; medfed's ServerApp (coordinator + FlowerLink, poll 0.05 s)
                  and ClientApp
  flower-fast     SuperNodes with medfed's fast options (node poll 0.1 s, SuperExec poll 0.1 s,
                  long-lived ClientApp worker); a bare Grid-API ServerApp pushing and pulling
                  itself every 0.05 s (no medfed code on the server)
  medfed-fast     the same SuperNodes; medfed's ServerApp

Start-up: from launching the SuperLink to the end of the first round. Seconds per round:
median of the rounds after the first. Memory: the largest RSS and PSS of each process tree
(SuperLink with its SuperExec and ServerApp; SuperNode with its SuperExec or worker and
ClientApps) sampled every 0.25 s during the run. CPU: CPU seconds of all trees over the run.
Run: python benchmarks/bench_flower_floor.py [--rounds-stock 4] [--rounds-fast 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medfed.deploy import site as echo_site
from medfed.deploy.certs import make_certs
from medfed.deploy.coordinator import RESULT, encode_request
from medfed.deploy.link import EXCHANGE, payload_content, payload_of
from medfed.deploy.processes import CLIENT_APP, FlowerApp, free_port, start_superlink, start_supernode, stop_all

SITES = ("a", "b", "c")
THIS = Path(__file__)

# -- the bare Flower app shipped in the FAB of the flower-* variants ----------------------

floor_server = ServerApp()
floor_client = ClientApp()


def _wait_nodes(grid: Grid, n: int, timeout_s: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(ids := sorted(grid.get_node_ids())) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return ids


def _pull_all(grid: Grid, ids: list[str], poll_s: float) -> list[Message]:
    """Flower's send_and_receive loop, polling every ``poll_s`` instead of 3 s."""
    pending, out = set(ids), []
    while pending:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            out.append(reply)
        if pending:
            time.sleep(poll_s)
    return out


@floor_server.main()
def _floor_main(grid: Grid, context: Context) -> None:
    cfg = dict(context.run_config)
    started = time.time()
    nodes = _wait_nodes(grid, int(cfg["n-sites"]))
    record = {"started": started, "sites_known": time.time(), "rounds": []}
    vector = np.zeros(echo_site.SIZE)
    for r in range(int(cfg["rounds"])):
        if cfg["mode"] == "stock":
            messages = [Message(RecordDict({"m": ArrayRecord([vector])}), n, "train") for n in nodes]
            replies = grid.send_and_receive(messages)
            uploads = [m.content.array_records["m"].to_numpy_ndarrays()[0] for m in replies]
        else:  # medfed's ClientApp at the sites (the fast sites' worker runs only it)
            messages = [Message(payload_content(encode_request(r, vector)), n, EXCHANGE) for n in nodes]
            replies = _pull_all(grid, list(grid.push_messages(messages)), float(cfg["poll-s"]))
            uploads = [np.frombuffer(payload_of(m), "<f8") for m in replies]
        assert len(uploads) == len(nodes), [m.error for m in replies if m.has_error()]
        vector = np.mean(uploads, axis=0)
        record["rounds"].append({"round": r, "ended": time.time()})
    record["vector"] = vector.tolist()
    out = Path(str(cfg["out"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT).write_text(json.dumps(record))


@floor_client.train()
def _floor_train(message: Message, context: Context) -> Message:
    vector = message.content.array_records["m"].to_numpy_ndarrays()[0]
    local = vector + echo_site.STEP * (echo_site.target(str(context.node_config["site"])) - vector)
    return Message(RecordDict({"m": ArrayRecord([local])}), reply_to=message)


# -- the benchmark ------------------------------------------------------------------------

VARIANTS = {
    # name: (server app, client app, fast sites)
    "flower-stock": (f"{THIS.stem}:floor_server", f"{THIS.stem}:floor_client", False),
    "medfed": (None, None, False),
    "flower-fast": (f"{THIS.stem}:floor_server", CLIENT_APP, True),
    "medfed-fast": (None, None, True),
}


def _cpu_s(pid: int) -> float:
    """utime + stime + children's (reaped) utime + stime of one process, in seconds."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run_variant(name: str, rounds: int, work: Path) -> dict:
    server, client, fast = VARIANTS[name]
    certs = make_certs(work / "certs", list(SITES))
    out = work / "out"
    config = {"out": str(out), "rounds": rounds, "poll-s": 0.05}
    if server is None:
        app = FlowerApp({**config, "sites": ",".join(SITES), "round-timeout-s": 60})
    else:
        app = FlowerApp({**config, "mode": "fast" if fast else "stock", "n-sites": len(SITES)},
                        serverapp=server, clientapp=client, files={THIS.name: THIS.read_bytes()})
    node_options = dict(task_poll_s=0.1, node_poll_s=0.1, worker=True) if fast else {}
    started = []
    t0 = time.time()
    try:
        link = start_superlink(certs, work, port=free_port(), task_poll_s=0.1 if fast else None)
        started.append(link)
        ids = link.register({s: certs.site(s).public_key for s in SITES})
        nodes = [start_supernode(s, certs, link.address, work, port=free_port(), **node_options) for s in SITES]
        started += nodes
        link.wait_online(ids.values(), timeout_s=60)
        run_id = link.start_run(app)
        trees = {"superlink": link.process, **{f"supernode-{s}": n for s, n in zip(SITES, nodes, strict=True)}}
        peak = {k: {"rss_mib": 0.0, "pss_mib": 0.0} for k in trees}
        deadline = time.monotonic() + 600
        while (status := link.run_status(run_id)).status != "finished" and time.monotonic() < deadline:
            for key, proc in trees.items():
                mem = proc.memory_mib()
                for m in ("rss_mib", "pss_mib"):
                    peak[key][m] = max(peak[key][m], mem[m])
            time.sleep(0.25)
        cpu = sum(_cpu_s(pid) for proc in trees.values() for pid, _ in proc.tree())
        assert status.ok, f"{name}: {status}\n{link.process.log_tail(30)}"
    finally:
        stop_all(started)
    record = json.loads((out / RESULT).read_text())
    ends = [r["ended"] for r in record["rounds"]]
    expected = (1 - echo_site.STEP ** rounds) * np.mean([echo_site.target(s) for s in SITES], axis=0)
    np.testing.assert_allclose(record["vector"], expected, rtol=0, atol=1e-12)
    return {"variant": name, "rounds": rounds, "startup_s": ends[0] - t0,
            "s_per_round": statistics.median(np.diff(ends)), "wall_s": time.time() - t0, "cpu_s": cpu,
            "memory": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-stock", type=int, default=4)
    parser.add_argument("--rounds-fast", type=int, default=15)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="medfed-floor-") as tmp:
        for name, (_, _, fast) in VARIANTS.items():
            rounds = args.rounds_fast if fast else args.rounds_stock
            results.append(run_variant(name, rounds, Path(tmp) / name))
            print(f"{name}: done", flush=True)
    print(f"\n{'variant':<14}{'rounds':>7}{'start-up s':>12}{'s/round':>9}{'wall s':>8}{'CPU s':>8}"
          f"{'SuperLink RSS/PSS MiB':>24}{'SuperNode RSS/PSS MiB':>24}")
    for r in results:
        link, node = r["memory"]["superlink"], r["memory"]["supernode-a"]
        print(f"{r['variant']:<14}{r['rounds']:>7}{r['startup_s']:>12.2f}{r['s_per_round']:>9.2f}{r['wall_s']:>8.1f}"
              f"{r['cpu_s']:>8.1f}"
              f"{link['rss_mib']:>14.0f} / {link['pss_mib']:<7.0f}{node['rss_mib']:>14.0f} / {node['pss_mib']:<7.0f}")
    by = {r["variant"]: r for r in results}
    for a, b in (("medfed", "flower-stock"), ("medfed-fast", "flower-fast"), ("medfed-fast", "flower-stock")):
        print(f"{a} / {b}: s/round x{by[a]['s_per_round'] / by[b]['s_per_round']:.3f}, "
              f"start-up x{by[a]['startup_s'] / by[b]['startup_s']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
