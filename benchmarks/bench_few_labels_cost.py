"""Few labels (issue 14 §4): each method's seconds per communication round against FedAvg's on the same data.

A round's cost is read from two runs that differ only in their number of rounds (or, for contrastive's
pretraining, of pretraining rounds): the difference of results.json's ``setting_runtime_s`` (training and
evaluation in the process) over the difference in rounds, so start-up, data loading and evaluation cancel.
Each probe is measured in pairs with FedAvg on the same flags, interleaved: method low, FedAvg low, method
high, FedAvg high, with the order within each pair of commands swapped every other pair, and a probe's
ratio is the median over ``--pairs`` of (method's seconds per round) / (FedAvg's of the same pair), so a
load change on the shared machine hits both sides of a ratio alike.

The data, model and training flags are bench_few_labels.py's (breast-cancer ``logistic``; mni-phantom
``cnn2d`` at 32 x 32, 150 images a site) at ``--labeled-fraction 0.1`` (so semi-supervised and contrastive
have unlabeled rows). Probes: semisupervised, vat, distill (breast-cancer: its teacher a Mix model saved
first), contrastive's pretraining round (pretrain_rounds 1 vs 1 + k at the low round count) and its
fine-tuning round (pretrain_rounds 1, rounds low vs high), FedAvg with ``--loss gce``.

Measured (benchmarks/measured/few_labels_cost.md/.json), ratio to FedAvg's round in the same interleaved pair,
median (min-max) over 3 pairs; ``--pairs 3`` took 353 s on a quiet 2-core machine (one other benchmark beside it),
after contrastive pretraining took the model's thread limit and distill kept its teacher's outputs::

    data set       method                           wall x FedAvg       CPU x FedAvg        FedAvg s / round
    breast-cancer  SemiSup                          2.66 (2.54-3.24)    2.68 (2.60-3.46)    0.0004
                   VAT                              1.67 (1.61-1.88)    1.55 (1.41-2.10)
                   Distill                          2.09 (2.02-2.73)    2.17 (2.04-3.04)
                   FedAvg + GCE                     1.23 (1.14-1.26)    1.32 (1.02-1.39)
    mni-phantom    SemiSup                          1.39 (1.36-1.42)    1.44 (1.39-1.52)    0.12 (cnn2d)
                   VAT                              1.70 (1.66-1.72)    1.68 (1.59-1.84)
                   Distill                          2.66 (2.47-2.67)    2.52 (2.29-2.64)
                   Contrastive, pretraining round   3.93 (3.50-3.96)    3.82 (3.46-3.97)
                   Contrastive, fine-tuning round   1.03 (0.96-1.07)    0.97 (0.97-1.10)
                   FedAvg + GCE                     1.05 (1.02-1.08)    1.04 (0.98-1.12)

At 10% labels a FedAvg site trains on its few labeled rows; the methods that learn from the unlabeled rows
train on up to ten times as many, which is most of their cost: Distill 2.1-2.7x (its soft term runs on every
unlabeled row; the teacher scores them once per site), SemiSup 1.4x on images and 2.7x on the table (the
full-batch logistic step grows with the pseudo-labeled rows), a contrastive pretraining round 3.9x (two views
of every row, labeled or not, through the encoder). VAT costs 1.7x (a second forward/backward pass for the
adversarial direction); GCE nothing measurable on images. Before the thread fix a pretraining round ran at
torch's default thread count (CPU time above wall time), 21-30x FedAvg under load; before the teacher's outputs
were kept, Distill was 2.9-3.0x on mni-phantom.

Run: python benchmarks/bench_few_labels_cost.py [--pairs 3] [--cases breast-cancer,mni-phantom] [--out DIR]
(CPU seconds: the child process's user + system time from getrusage, start-up cancelled by the difference.)
Writes DIR/few_labels_cost.md and DIR/few_labels_cost.json (DIR default: a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

from bench_few_labels import (  # the sibling script: same data flags, same run wrapper
    cases,
    medfed_run,
)

FRACTION = "0.1"


@dataclass(frozen=True)
class Probe:
    """One cost to measure: the method's flags at the low and the high count, and how many rounds apart."""

    label: str
    setting: str  # the setting's display name in results.json
    low: tuple[str, ...]
    high: tuple[str, ...]
    extra_rounds: int  # counted rounds between high and low


@dataclass(frozen=True)
class Budget:
    low: int  # rounds of the low runs
    high: int
    pretrain_extra: int = 0  # contrastive pretraining rounds added in its high run


# contrastive's pretraining probe adds as many rounds as the others (2 extra were lost in the run-to-run noise)
BUDGETS = {"breast-cancer": Budget(10, 510), "mni-phantom": Budget(2, 14, 12)}
PROBED = {"breast-cancer": ("semisupervised", "vat", "distill", "gce"),
          "mni-phantom": ("semisupervised", "vat", "distill", "contrastive-pretrain", "contrastive-finetune", "gce")}
DISPLAY = {"semisupervised": "SemiSup", "vat": "VAT", "distill": "Distill", "contrastive": "Contrastive"}


def without_rounds(flags: tuple[str, ...]) -> list[str]:
    """The case's flags less its ``--rounds N`` (each probe sets its own)."""
    i = flags.index("--rounds")
    return [*flags[:i], *flags[i + 2:]]


def probes(case: str, budget: Budget, teacher: list[str]) -> list[Probe]:
    lo, hi = ("--rounds", str(budget.low)), ("--rounds", str(budget.high))
    extra = budget.high - budget.low
    out = []
    for name in PROBED[case]:
        if name == "gce":
            flags = ("--methods", "fedavg", "--loss", "gce")
            out.append(Probe("FedAvg + GCE", "FedAvg", (*flags, *lo), (*flags, *hi), extra))
        elif name.startswith("contrastive"):
            pre = ("--methods", "contrastive", "--method-option")
            one = (*pre, "contrastive.pretrain_rounds=1")
            if name == "contrastive-pretrain":
                more = (*pre, f"contrastive.pretrain_rounds={1 + budget.pretrain_extra}")
                out.append(Probe("Contrastive (pretraining round)", "Contrastive", (*one, *lo), (*more, *lo),
                                 budget.pretrain_extra))
            else:
                out.append(Probe("Contrastive (fine-tuning round)", "Contrastive", (*one, *lo), (*one, *hi), extra))
        else:
            flags = ("--methods", name, *(teacher if name == "distill" else ()))
            out.append(Probe(DISPLAY[name], DISPLAY[name], (*flags, *lo), (*flags, *hi), extra))
    return out


@dataclass(frozen=True)
class Timing:
    wall: float  # the setting's in-process wall seconds (results.json)
    cpu: float  # the whole child process's user + system CPU seconds (start-up included: it cancels)


def seconds(base: list[str], flags: tuple[str, ...], setting: str, out: str) -> Timing:
    # CPU time as well as wall time: on a machine shared with other jobs the wall clock counts their load
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = medfed_run([*base, *flags], out)["setting_runtime_s"][setting]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Timing(wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))


@dataclass
class Pair:
    case: str
    probe: str
    pair: int
    method_s_per_round: float  # wall
    fedavg_s_per_round: float
    ratio: float
    method_cpu_per_round: float
    fedavg_cpu_per_round: float
    cpu_ratio: float


def measure(case: str, probe: Probe, budget: Budget, base: list[str], pair: int, tmp: str) -> Pair:
    # FedAvg's own low/high pair (also for contrastive pretraining, whose two runs share the round count)
    fedavg = Probe("FedAvg", "FedAvg", ("--methods", "fedavg", "--rounds", str(budget.low)),
                   ("--methods", "fedavg", "--rounds", str(budget.high)), budget.high - budget.low)
    # interleaved: low of both, then high of both; who goes first alternates with the pair
    order = (probe, fedavg) if pair % 2 == 0 else (fedavg, probe)
    times: dict[tuple[str, str], Timing] = {}
    for level in ("low", "high"):
        for p in order:
            times[p.label, level] = seconds(base, getattr(p, level), p.setting, os.path.join(tmp, "run"))

    def per_round(label: str, extra: int, kind: str) -> float:
        return (getattr(times[label, "high"], kind) - getattr(times[label, "low"], kind)) / extra

    wall, wall_f = per_round(probe.label, probe.extra_rounds, "wall"), per_round("FedAvg", fedavg.extra_rounds, "wall")
    cpu, cpu_f = per_round(probe.label, probe.extra_rounds, "cpu"), per_round("FedAvg", fedavg.extra_rounds, "cpu")
    return Pair(case, probe.label, pair, wall, wall_f, wall / wall_f, cpu, cpu_f, cpu / cpu_f)


def summary(pairs: list[Pair]) -> dict:
    out: dict = {}
    for p in pairs:
        out.setdefault(p.case, {}).setdefault(p.probe, []).append(p)
    return {case: {probe: {"ratio_median": statistics.median(x.ratio for x in got),
                           "ratios": [x.ratio for x in got],
                           "method_s_per_round_median": statistics.median(x.method_s_per_round for x in got),
                           "fedavg_s_per_round_median": statistics.median(x.fedavg_s_per_round for x in got),
                           "cpu_ratio_median": statistics.median(x.cpu_ratio for x in got),
                           "cpu_ratios": [x.cpu_ratio for x in got],
                           "method_cpu_per_round_median": statistics.median(x.method_cpu_per_round for x in got),
                           "fedavg_cpu_per_round_median": statistics.median(x.fedavg_cpu_per_round for x in got)}
                   for probe, got in by_probe.items()} for case, by_probe in out.items()}


def markdown(table: dict, pairs: int) -> str:
    lines = [(f"Seconds per round from run-length differences (labeled fraction {FRACTION}); ratio = method / FedAvg "
             f"in the same interleaved pair, median over {pairs} pairs (min-max in brackets)."), "",
             ("| data set | method | wall s / round | FedAvg | x FedAvg (median) | min-max "
              "| CPU s / round | FedAvg | x FedAvg (median) | min-max |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case, rows in table.items():
        for probe, row in rows.items():
            lines.append(f"| {case} | {probe} | {row['method_s_per_round_median']:.4f} | "
                         f"{row['fedavg_s_per_round_median']:.4f} | {row['ratio_median']:.2f} | "
                         f"{min(row['ratios']):.2f}-{max(row['ratios']):.2f} | "
                         f"{row['method_cpu_per_round_median']:.4f} | {row['fedavg_cpu_per_round_median']:.4f} | "
                         f"{row['cpu_ratio_median']:.2f} | {min(row['cpu_ratios']):.2f}-{max(row['cpu_ratios']):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="interleaved method/FedAvg pairs per probe")
    parser.add_argument("--cases", default="breast-cancer,mni-phantom")
    parser.add_argument("--out", help="folder for few_labels_cost.md/.json (default: a temp folder)")
    args = parser.parse_args()
    known = cases(1.0, 150)
    out = args.out or tempfile.mkdtemp(prefix="medfed-fewcost-out-")
    os.makedirs(out, exist_ok=True)
    measured: list[Pair] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medfed-fewcost-") as tmp:
        for name in args.cases.split(","):
            budget = BUDGETS[name]
            base = [*without_rounds(known[name].flags), "--seed", "0", "--labeled-fraction", FRACTION]
            teacher = []
            if "distill" in PROBED[name]:
                medfed_run([*known[name].flags, "--seed", "0", "--methods", "mix", "--save-model"],
                           os.path.join(tmp, "teacher"))
                teacher = ["--teacher", os.path.join(tmp, "teacher", "models", "Mix.npz")]
            for pair in range(args.pairs):
                for probe in probes(name, budget, teacher):
                    got = measure(name, probe, budget, base, pair, tmp)
                    measured.append(got)
                    print(f"{name} pair {pair} {probe.label}: {got.method_s_per_round:.4f} s/round, "
                          f"FedAvg {got.fedavg_s_per_round:.4f}, x{got.ratio:.2f}; CPU x{got.cpu_ratio:.2f}", flush=True)
    wall = time.perf_counter() - started
    table = summary(measured)
    text = markdown(table, args.pairs) + f"\nWall time {wall:.0f} s.\n"
    print("\n" + text)
    with open(os.path.join(out, "few_labels_cost.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "few_labels_cost.json"), "w") as fh:
        json.dump({"fraction": float(FRACTION), "budgets": {k: asdict(v) for k, v in BUDGETS.items()},
                   "pairs": args.pairs, "wall_s": wall, "summary": table, "measured": [asdict(p) for p in measured]},
                  fh, indent=2)
    print(f"wrote few_labels_cost.md, few_labels_cost.json to {out}")


if __name__ == "__main__":
    main()
