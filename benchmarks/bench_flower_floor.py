"""Flower's own floor against medfed on Flower: start-up, seconds per round, memory, CPU.

A deployment on 127.0.0.1: a SuperLink and 3 SuperNodes as separate processes, TLS and
node authentication on, keys registered from code. The round is the same everywhere: each
site moves a float64 vector of 100 half-way to its own target and the server averages (a
bare FedAvg), so every run must end on the same vector. Two site setups, one deployment
each; on each, Flower's bare ServerApp and medfed's run in interleaved pairs (alternating
which goes first), so drift moves both sides of every ratio alike:

  stock sites   Flower's SuperNodes as they come. flower: a bare Grid-API ServerApp with
                Flower's ``grid.send_and_receive`` and a plain Flower ClientApp. medfed:
                medfed's ServerApp (coordinator + FlowerLink, poll 0.05 s) and ClientApp.
  fast sites    medfed's fast options (node poll 0.1 s, SuperExec poll 0.1 s, long-lived
                ClientApp worker, which runs medfed's ClientApp only). flower: a bare
                Grid-API ServerApp pushing and pulling itself every 0.05 s with the same quick
                object retries, no medfed code on the server. medfed: medfed's ServerApp.

Deployment start-up: launching the SuperLink until every SuperNode is online. Run start-up:
starting the run until the end of its first round. Seconds per round: median of the rounds
after the first. Memory: the largest RSS and PSS of each process tree (SuperLink with its
SuperExec and ServerApp; SuperNode with its SuperExec or worker and ClientApps), sampled
every 0.25 s. CPU: CPU seconds of all trees during the run (reaped children included).
Run: python benchmarks/bench_flower_floor.py [--rounds-stock 4] [--rounds-fast 15] [--pairs-fast 3]
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

from medfed.deploy import echo as echo_site
from medfed.deploy.certs import make_certs
from medfed.deploy.echo import RESULT, encode_request
from medfed.deploy.flower_patches import quick_object_retries
from medfed.deploy.link import EXCHANGE, payload_content, payload_of
from medfed.deploy.processes import CLIENT_APP, FlowerApp, free_port, start_superlink, start_supernode, stop_all

SITES = ("a", "b", "c")
VARIANTS = ("flower", "medfed", "study")
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
    """Flower's send_and_receive loop, polling every ``poll_s`` instead of 3 s (and, as
    FlowerLink does, retrying a reply's missing objects after ``poll_s`` instead of 1 s)."""
    import sys

    quick_object_retries(sys.modules[type(grid).__module__], poll_s)
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

SETUPS = {"stock": {}, "fast": dict(task_poll_s=0.1, node_poll_s=0.1, worker=True)}


STUDY = """methods = ["fedavg"]
seed = 0
repeats = 1
[training]
rounds = {rounds}
local_steps = 10
[data]
site_column = "site"
label_column = "target"
impute = "median"
[deploy]
sites = ["a", "b", "c"]
round_timeout_s = 60
"""


def write_study(work: Path, rounds: int) -> Path:
    """heart-disease's first three hospitals as sites a, b, c (one file each) and a FedAvg study."""
    import pandas as pd

    from medfed.data.datasets import load_dataset

    fed = load_dataset("heart-disease")
    for name, site in zip(SITES, fed.sites, strict=False):
        df = pd.DataFrame(site.X, columns=list(fed.feature_names))
        df.insert(0, "site", name)
        df["target"] = site.y.astype(int)
        df.to_csv(work / f"{name}.csv", index=False)
    path = work / "study.toml"
    path.write_text(STUDY.format(rounds=rounds))
    return path


def make_app(variant: str, setup: str, out: Path, rounds: int) -> FlowerApp:
    if variant == "study":  # medfed's real round: FedAvg on heart-disease, wire bytes, site state on disk
        return FlowerApp({"program": "study", "study": str(out.parent / "study.toml"), "out": str(out),
                          "poll-s": 0.05, "join-timeout-s": 60.0})
    config = {"program": "echo", "out": str(out), "rounds": rounds, "poll-s": 0.05}
    if variant == "medfed":
        return FlowerApp({**config, "sites": ",".join(SITES), "round-timeout-s": 60})
    client = f"{THIS.stem}:floor_client" if setup == "stock" else CLIENT_APP
    return FlowerApp({**config, "mode": setup, "n-sites": len(SITES)}, serverapp=f"{THIS.stem}:floor_server",
                     clientapp=client, files={THIS.name: THIS.read_bytes()})


def _cpu_s(pid: int) -> float:
    """utime + stime + reaped children's utime + stime of one process, in seconds."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def timed_run(link, trees: dict, app: FlowerApp, out: Path, rounds: int) -> dict:
    cpu = lambda: sum(_cpu_s(pid) for proc in trees.values() for pid, _ in proc.tree())  # noqa: E731
    peak = {k: {"rss_mib": 0.0, "pss_mib": 0.0} for k in trees}
    cpu_before, started = cpu(), time.time()
    run_id = link.start_run(app)
    deadline = time.monotonic() + 600
    while (status := link.run_status(run_id)).status != "finished" and time.monotonic() < deadline:
        for key, proc in trees.items():
            mem = proc.memory_mib()
            for m in ("rss_mib", "pss_mib"):
                peak[key][m] = max(peak[key][m], mem[m])
        time.sleep(0.25)
    assert status.ok, f"{status}\n{link.process.log_tail(30)}"
    used = cpu() - cpu_before
    if not (out / RESULT).exists():  # the study: its rounds' ends are in the coordinator's log
        ends = _round_ends(link.save_run_log(run_id))
        assert len(ends) == rounds, f"{len(ends)} rounds logged, {rounds} expected"
        return {"run_startup_s": ends[0] - started, "s_per_round": statistics.median(np.diff(ends)),
                "own_s_per_round": None, "cpu_s": used, "memory": peak}
    record = json.loads((out / RESULT).read_text())
    ends = [r["ended"] for r in record["rounds"]]
    expected = (1 - echo_site.STEP ** rounds) * np.mean([echo_site.target(s) for s in SITES], axis=0)
    np.testing.assert_allclose(record["vector"], expected, rtol=0, atol=1e-12)
    # medfed's own seconds per round: the round's wall time outside Flower's Grid calls and waits
    own = [r["wall_s"] - r["grid_s"] - r["wait_s"] for r in record["rounds"][1:] if "wall_s" in r]
    return {"run_startup_s": ends[0] - started, "s_per_round": statistics.median(np.diff(ends)),
            "own_s_per_round": statistics.median(own) if own else None, "cpu_s": used, "memory": peak}


def _round_ends(log: Path) -> list[float]:
    """When each round ended, from the coordinator's log lines 'FedAvg: round k/N'."""
    from datetime import datetime

    ends = []
    for line in log.read_text().splitlines():
        if "FedAvg: round " in line:
            stamp = line[:23]
            ends.append(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return ends


def bench_setup(setup: str, rounds: int, pairs: int, work: Path) -> dict:
    certs = make_certs(work / "certs", list(SITES))
    started = []
    t0 = time.time()
    try:
        link = start_superlink(certs, work, port=free_port(), task_poll_s=0.1 if setup == "fast" else None)
        started.append(link)
        ids = link.register({s: certs.site(s).public_key for s in SITES})
        write_study(work, rounds)
        nodes = [start_supernode(s, certs, link.address, work, port=free_port(), **SETUPS[setup],
                                 node_config={"data": str(work / f"{s}.csv"), "folder": str(work / f"site-{s}")})
                 for s in SITES]
        started += nodes
        assert link.wait_online(ids.values(), timeout_s=60) == set(ids.values())
        deploy_s = time.time() - t0
        trees = {"superlink": link.process, **{f"supernode-{s}": n for s, n in zip(SITES, nodes, strict=True)}}
        runs: dict[str, list] = {v: [] for v in VARIANTS}
        for i in range(pairs):
            for variant in VARIANTS[i % 3:] + VARIANTS[:i % 3]:  # each variant first in turn
                out = work / f"{variant}-{i}"
                runs[variant].append(timed_run(link, trees, make_app(variant, setup, out, rounds), out, rounds))
                print(f"{setup} sites, {variant} run {i + 1}/{pairs}: {runs[variant][-1]['s_per_round']:.2f} s/round",
                      flush=True)
    finally:
        stop_all(started)
    return {"setup": setup, "rounds": rounds, "pairs": pairs, "deploy_startup_s": deploy_s, "runs": runs}


def summary(result: dict, variant: str) -> dict:
    runs = result["runs"][variant]
    return {"run_startup_s": statistics.median(r["run_startup_s"] for r in runs),
            "s_per_round": statistics.median(r["s_per_round"] for r in runs),
            "cpu_per_round_s": statistics.median(r["cpu_s"] / result["rounds"] for r in runs),
            **{f"{tree}_{m}": max(r["memory"][tree][m] for r in runs)
               for tree in ("superlink", "supernode-a") for m in ("rss_mib", "pss_mib")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-stock", type=int, default=4)
    parser.add_argument("--rounds-fast", type=int, default=15)
    parser.add_argument("--pairs-stock", type=int, default=1)
    parser.add_argument("--pairs-fast", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medfed-floor-") as tmp:
        results = [bench_setup("stock", args.rounds_stock, args.pairs_stock, Path(tmp) / "stock"),
                   bench_setup("fast", args.rounds_fast, args.pairs_fast, Path(tmp) / "fast")]
    print(f"\n{'sites':<6}{'server':<8}{'deploy s':>9}{'run start-up s':>15}{'s/round':>9}{'CPU s/round':>12}"
          f"{'SuperLink RSS/PSS MiB':>23}{'SuperNode RSS/PSS MiB':>23}")
    for result in results:
        for variant in VARIANTS:
            s = summary(result, variant)
            print(f"{result['setup']:<6}{variant:<8}{result['deploy_startup_s']:>9.2f}{s['run_startup_s']:>15.2f}"
                  f"{s['s_per_round']:>9.2f}{s['cpu_per_round_s']:>12.2f}"
                  f"{s['superlink_rss_mib']:>13.0f} / {s['superlink_pss_mib']:<7.0f}"
                  f"{s['supernode-a_rss_mib']:>13.0f} / {s['supernode-a_pss_mib']:<7.0f}")
    for result in results:
        for variant in ("medfed", "study"):
            ratios = sorted(m["s_per_round"] / f["s_per_round"]
                            for m, f in zip(result["runs"][variant], result["runs"]["flower"], strict=True))
            print(f"{result['setup']} sites: {variant} / flower s/round, per pair: "
                  f"median x{statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})")
    for result in results:
        own = [r["own_s_per_round"] for r in result["runs"]["medfed"]]
        per_round = summary(result, "medfed")["s_per_round"]
        print(f"{result['setup']} sites: medfed's own work per round (outside Grid calls and waits): "
              f"{1000 * statistics.median(own):.2f} ms = {100 * statistics.median(own) / per_round:.2f} % of its round")
    floor = summary(results[0], "flower")
    for variant in ("medfed", "study"):
        fast = summary(results[1], variant)
        print(f"{variant} on fast sites / Flower's stock floor: s/round x{fast['s_per_round'] / floor['s_per_round']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
