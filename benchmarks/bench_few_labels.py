"""Few labels (issue 14 §3-§4): test metric against the labeled fraction, per method, and each method's cost.

Cases: breast-cancer with ``logistic``; mni-phantom atrophy with ``cnn2d`` on 32 x 32 slices (AUC);
mni-phantom-seg, lesion segmentation with ``unet2d`` on 32 x 32 slices, 15 mm lesions, 60 images a site (Dice).
For each case, each seed and each labeled fraction (default 1.0, 0.1, 0.02; mni-phantom-seg's run refuses
0.02, which leaves a site no labeled image of its 48, so it has 1.0 and 0.1) it runs ``medfed run`` in a fresh
interpreter into a temp folder, as a user would:

* per seed, first ``--methods mix`` on ALL labels: the ceiling and, saved with ``--save-model``, the Mix
  teacher ``distill`` reads (``--teacher``). It is trained at the same seed, so on the same train/test
  split: the teacher never saw the student's test rows. One teacher per seed.
* per seed and fraction, ``--labeled-fraction F`` with FedAvg (labeled rows only) and the methods that
  apply, in one command (so their timings share one process): semisupervised, vat, distill (the seed's saved
  Mix, numpy or torch) and, on the torch encoder, contrastive (cnn2d, its default 10 pretraining rounds);
  on segmentation FedAvg and semisupervised (threshold 0.99, weight 0.1), as vat, distill and contrastive
  refuse the task;
  then, on classification, FedAvg with ``--loss gce`` in a second command (``--loss`` applies to every
  method of a run; segmentation keeps its own loss).

The headline metric is each run's AUC (Dice) averaged over the test sites; the table and the plot give its
mean ± sample std over the seeds. Cost is results.json's per-setting ``setting_runtime_s`` (training and
evaluation in the process, no imports), per run and per communication round (contrastive's pretraining
rounds count), and its ratio to FedAvg's in the same command (for FedAvg + GCE, in the command beside it),
median over seeds and fractions; bench_few_labels_cost.py measures the cost per round properly.
The runs are saved to DIR/few_labels.json after every seed and fraction, so sweeps run apart (``--seeds``,
``--methods``, ``--fractions``) or stopped early are combined by ``--merge``.

Measured (the final budget, 3 seeds). Sweeps A-C ran in parallel on 2 cores shared with other agents' test
suites (load 5-15); D-G later on a quiet machine, after distill took torch teachers and unlabeled rows, semisupervised
segmentation and contrastive pretraining its thread limit; then merged (a run in two sweeps kept once, from
the first file named):

    python benchmarks/bench_few_labels.py --cases breast-cancer,mni-phantom-seg --methods mni-phantom-seg=fedavg --out A  # 1000 s
    python benchmarks/bench_few_labels.py --cases mni-phantom --methods mni-phantom=semisupervised,vat --out B  # 903 s
    python benchmarks/bench_few_labels.py --cases mni-phantom --methods mni-phantom=contrastive --fractions 0.1 --out C  # 547 s
    python benchmarks/bench_few_labels.py --cases mni-phantom --methods mni-phantom=distill,contrastive --out D  # 364 s
    python benchmarks/bench_few_labels.py --cases mni-phantom-seg --methods mni-phantom-seg=semisupervised --out E  # 136 s
    python benchmarks/bench_few_labels.py --cases mni-phantom --methods mni-phantom=contrastive --out F  # 294 s (10 pretraining rounds)
    python benchmarks/bench_few_labels.py --cases breast-cancer --methods breast-cancer=distill --out G  # 11 s
    python benchmarks/bench_few_labels.py --merge G/few_labels.json,F/few_labels.json,D/few_labels.json,E/few_labels.json,A/few_labels.json,B/few_labels.json,C/few_labels.json --out DIR

(benchmarks/measured/few_labels.md/.json/.png), metric mean ± sample std over seeds 0-2::

    data set         metric  method            @ 1             @ 0.1           @ 0.02
    breast-cancer    AUC     Mix (all labels)  0.990 ± 0.001   (same)          (same)
                             FedAvg            0.990 ± 0.001   0.990 ± 0.003   0.943 ± 0.046
                             SemiSup           0.990 ± 0.001   0.988 ± 0.005   0.915 ± 0.060
                             VAT               0.990 ± 0.003   0.988 ± 0.003   0.947 ± 0.047
                             Distill           0.991 ± 0.001   0.993 ± 0.002   0.988 ± 0.005
                             FedAvg + GCE      0.990 ± 0.002   0.990 ± 0.003   0.943 ± 0.046
    mni-phantom      AUC     Mix (all labels)  0.797 ± 0.097   (same)          (same)
                             FedAvg            0.789 ± 0.042   0.720 ± 0.050   0.510 ± 0.123
                             SemiSup           0.780 ± 0.046   0.653 ± 0.011   0.509 ± 0.116
                             VAT               0.751 ± 0.081   0.697 ± 0.027   0.480 ± 0.125
                             Distill           0.771 ± 0.051   0.743 ± 0.056   0.721 ± 0.116
                             Contrastive       0.783 ± 0.061   0.716 ± 0.058   0.505 ± 0.123
                             FedAvg + GCE      0.774 ± 0.042   0.723 ± 0.041   0.505 ± 0.124
    mni-phantom-seg  Dice    Mix (all labels)  0.591 ± 0.061   (same)          refused
                             FedAvg            0.409 ± 0.085   0.049 ± 0.070   refused
                             SemiSup (0.99,    0.432 ± 0.029   0.118 ± 0.086   refused
                             weight 0.1)

Findings. breast-cancer: only 2% labels (1-6 labeled rows a site of 64-359) hurts; Distill, its soft term on
the unlabeled rows, recovers nearly all the gap to Mix (0.988; Mix is its teacher, see below), VAT nothing
beyond noise, SemiSup makes it worse, GCE is FedAvg on clean labels. mni-phantom
(Mix per seed 0.822 / 0.879 / 0.689): at 10% labels (12 a site) FedAvg loses 0.07 AUC; only Distill wins some
back (0.743), SemiSup is worse (0.653), VAT worse (0.697), Contrastive (10 pretraining rounds) and GCE equal; at 2%
(2 labeled a site) every method but Distill is at chance, and Distill holds 0.721 - but its teacher is Mix
trained on ALL labels of the same training rows, so it measures how much of a teacher's knowledge the sites'
unlabeled rows carry over, not learning from 2% labels alone. Segmentation: FedAvg on 10% labels (about 5
labeled images a site) collapses to Dice 0.05 against 0.41 on all labels (Mix 0.59); SemiSup with confident
pseudo-masks only (threshold 0.99, weight 0.1) doubles it to 0.12, higher at every seed (0.047 / 0.214 / 0.093
against 0.010 / 0.130 / 0.006), still far from all labels; with its defaults it collapses to background
(client_end.py). The cost columns (in-process seconds per run and round, ratio to FedAvg in the same command)
mix loaded and quiet sweeps; bench_few_labels_cost.py measures the per-round cost interleaved.

Run: python benchmarks/bench_few_labels.py [--repeats 3 | --seeds 0,1] [--fractions 1,0.1,0.02]
     [--cases breast-cancer,mni-phantom,mni-phantom-seg] [--methods CASE=M1,M2 ...] [--rounds-scale 1.0]
     [--n-per-site 150] [--out DIR]; python benchmarks/bench_few_labels.py --merge A.json,B.json --out DIR
Writes DIR/few_labels.md, DIR/few_labels.json and DIR/few_labels.png (DIR default: a temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

# an installed package has its bytecode compiled: let the runs cache it (outside the source tree)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "medfed-fewbench-pycache")

GCE = "FedAvg + GCE"  # the display name of FedAvg run with --loss gce (the run itself calls it FedAvg)
CEILING = "Mix (all labels)"


@dataclass(frozen=True)
class Case:
    """One data set and model with the training budget its runs share."""

    name: str
    flags: tuple[str, ...]  # data, model and training flags of every run of this case
    rounds: int
    # the few-label methods that apply: contrastive needs a torch encoder (cnn2d, mlp); distill reads the
    # seed's saved Mix (numpy or torch); on segmentation only semisupervised runs; --methods overrides
    methods: tuple[str, ...]
    metric: str = "auc"  # the headline metric key of results.json's rows, averaged over the test sites
    # the run refuses a fraction that leaves a site no labeled training row: smaller ones are skipped
    min_fraction: float = 0.0
    gce: bool = True  # --loss gce applies to classification only (segmentation keeps its own loss)
    # METHOD.KEY=VALUE of the methods' command (not Mix's, not GCE's), for the listed methods only (the run
    # refuses options of a method it does not run)
    method_options: tuple[str, ...] = ()

    def method_flags(self) -> list[str]:
        return [flag for option in self.method_options if option.split(".")[0] in self.methods
                for flag in ("--method-option", option)]


def cases(rounds_scale: float, n_per_site: int) -> dict[str, Case]:
    # budgets keep the default sweep near 15 minutes on 2 shared cores; --rounds-scale grows them
    bc_rounds = max(1, round(50 * rounds_scale))
    mni_rounds = max(1, round(40 * rounds_scale))
    return {
        "breast-cancer": Case("breast-cancer", ("--dataset", "breast-cancer", "--model", "logistic",
                                                "--rounds", str(bc_rounds)), bc_rounds,
                              ("fedavg", "semisupervised", "vat", "distill")),
        # 32 x 32 and 40 rounds x 10 steps: Mix AUC ~0.85 (at 16 x 16 and 20 x 5 it was 0.59, ranking nothing);
        # lr 0.001 let FedAvg's loss end above 2x its start (seed 1), 0.0005 did not
        "mni-phantom": Case("mni-phantom", (
            "--dataset", "mni-phantom", "--dataset-option", "size=32", "--dataset-option", f"n_per_site={n_per_site}",
            "--model", "cnn2d", "--rounds", str(mni_rounds), "--local-steps", "10", "--batch-size", "32",
            "--lr", "0.0005", "--threads", "1"), mni_rounds,
            # contrastive pretrains for its default 10 rounds: a pretraining round costs about 3.5x a FedAvg
            # round (bench_few_labels_cost.py, after pretraining took the model's thread limit)
            ("fedavg", "semisupervised", "vat", "distill", "contrastive")),
        # the data set's documented segmentation budget (mni_phantom.py: Mix Dice ~0.56); 60 images a site
        # leave 48 training images, so 0.02 leaves a site none labeled and the run refuses it
        "mni-phantom-seg": Case("mni-phantom-seg", (
            "--dataset", "mni-phantom", "--dataset-option", "task=segmentation", "--dataset-option", "size=32",
            "--dataset-option", "lesion_mm=15", "--dataset-option", "n_per_site=60", "--model", "unet2d",
            "--rounds", str(mni_rounds), "--local-steps", "10", "--batch-size", "16", "--lr", "0.01",
            "--threads", "1"), mni_rounds, ("fedavg", "semisupervised"), metric="dice", min_fraction=0.1, gce=False,
            # the defaults (0.95, weight 1) collapse to all-background pseudo-masks (client_end.py's measurements)
            method_options=("semisupervised.threshold=0.99", "semisupervised.weight=0.1")),
    }


@dataclass
class Run:
    """One setting's numbers from one command: the case's metric (mean over test sites), seconds and rounds."""

    case: str
    method: str  # display label in the table
    fraction: float
    seed: int
    score: float  # the case's metric (AUC or Dice)
    seconds: float
    rounds: int | None  # communication rounds (None: centralized)
    fedavg_seconds: float | None = None  # FedAvg's in the same (or the paired) command


@dataclass
class Sweep:
    runs: list[Run] = field(default_factory=list)


def medfed_run(flags: list[str], out: str) -> dict:
    cmd = [sys.executable, "-m", "medfed.cli.app", "run", *flags, "--repeats", "1", "--no-plots", "--out", out,
           "--overwrite"]
    done = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    if done.returncode != 0:
        sys.exit(f"medfed run failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr.strip()[-2000:]}")
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


def settings(result: dict, metric: str) -> dict[str, tuple[float, float, int | None]]:
    """Per setting display name: (``metric`` averaged over the test sites, in-process seconds, rounds)."""
    scores: dict[str, list[float]] = {}
    for row in result["results"]:
        if row["evaluation"] == "split" and row["model"] == "global" and row["computable"]:
            scores.setdefault(row["setting"], []).append(row["metrics"][metric]["mean"])
    rounds = {c["setting"]: c["rounds"] for c in result["communication"]}
    return {s: (statistics.fmean(v), result["setting_runtime_s"][s], rounds.get(s)) for s, v in scores.items()}


def case_fractions(case: Case, fractions: list[float]) -> list[float]:
    return [f for f in fractions if f >= case.min_fraction]


def sweep_case(case: Case, seeds: list[int], fractions: list[float], tmp: str, sweep: Sweep,
               saved: Callable[[], None]) -> None:
    """Append the case's runs to ``sweep``, calling ``saved`` after each seed and fraction (a long sweep
    on a loaded machine keeps what it has measured)."""
    distill = "distill" in case.methods
    for seed in seeds:
        teacher_dir = os.path.join(tmp, case.name, f"seed{seed}", "teacher")
        ceiling = settings(medfed_run([*case.flags, "--methods", "mix", "--seed", str(seed),
                                       *(["--save-model"] if distill else [])], teacher_dir), case.metric)["Mix"]
        teacher = ["--teacher", os.path.join(teacher_dir, "models", "Mix.npz")] if distill else []
        for fraction in case_fractions(case, fractions):
            sweep.runs.append(Run(case.name, CEILING, fraction, seed, ceiling[0], ceiling[1], None))
            base = [*case.flags, "--seed", str(seed), "--labeled-fraction", str(fraction)]
            out = os.path.join(tmp, case.name, f"seed{seed}", f"f{fraction}")
            got = settings(medfed_run([*base, "--methods", ",".join(case.methods), *case.method_flags(), *teacher], out), case.metric)
            fedavg_s = got["FedAvg"][1] if "FedAvg" in got else None
            for name, (score, seconds, rounds) in got.items():
                sweep.runs.append(Run(case.name, name, fraction, seed, score, seconds, rounds, fedavg_s))
            if case.gce:
                score, seconds, rounds = settings(medfed_run([*base, "--methods", "fedavg", "--loss", "gce"],
                                                             out + "-gce"), case.metric)["FedAvg"]
                sweep.runs.append(Run(case.name, GCE, fraction, seed, score, seconds, rounds, fedavg_s))
            print(f"{case.name:15s} seed {seed} F={fraction:<5g} " + "  ".join(
                f"{r.method} {r.score:.3f}" for r in sweep.runs if (r.case, r.seed, r.fraction) == (case.name, seed, fraction)),
                flush=True)
            saved()


def mean_std(values: list[float]) -> tuple[float, float | None, int] | None:
    """Mean, sample std (None below two values) and count; None for a fraction the case skips."""
    from medfed.experiments.results import STD_DDOF

    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > STD_DDOF else None), len(values)


def fmt(cell: tuple[float, float | None, int] | None, full: int) -> str:
    if cell is None:
        return "—"
    mean, std, n = cell
    text = f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"
    return text if n == full else f"{text} (n={n})"  # a sweep stopped early: fewer seeds in this cell


def method_order(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(r.method for r in runs))


def summary(sweep: Sweep, fractions: list[float], metrics: dict[str, str]) -> dict:
    """Per case: its metric and, per method, the metric's mean/std per fraction (None where the case skips
    it); cost per run and per round, and its ratio to FedAvg."""
    out: dict = {}
    for case in dict.fromkeys(r.case for r in sweep.runs):
        runs = [r for r in sweep.runs if r.case == case]
        out[case] = {"metric": metrics[case], "methods": {}}
        for method in method_order(runs):
            mine = [r for r in runs if r.method == method]
            score = {str(f): mean_std([r.score for r in mine if r.fraction == f]) for f in fractions}
            seconds = statistics.median(r.seconds for r in mine)
            per_round = statistics.median(r.seconds / r.rounds for r in mine) if mine[0].rounds else None
            ratio = (statistics.median(r.seconds / r.fedavg_seconds for r in mine)
                     if mine[0].fedavg_seconds else None)
            out[case]["methods"][method] = {"score": score, "seconds_per_run": seconds, "seconds_per_round": per_round,
                                            "ratio_to_fedavg": ratio, "rounds": mine[0].rounds}
    return out


def markdown(table: dict, fractions: list[float], seeds: list[int]) -> str:
    lines = [(f"Metric (mean over test sites; mean ± sample std over seeds {','.join(map(str, seeds))}, n shown where "
              "fewer) by labeled fraction "
             "(— : a fraction the case's run refuses); cost in the process (median over seeds and fractions; "
             "ratio to FedAvg's in the same sweep)."), "",
             "| data set | metric | method | " + " | ".join(f"@ {f:g}" for f in fractions)
             + " | s / run | s / round | x FedAvg |",
             "|---|---|---|" + "---:|" * (len(fractions) + 3)]
    for case, entry in table.items():
        for method, row in entry["methods"].items():
            scores = " | ".join(fmt(row["score"][str(f)], len(seeds)) for f in fractions)
            per_round = f"{row['seconds_per_round']:.4f}" if row["seconds_per_round"] is not None else "—"
            ratio = f"{row['ratio_to_fedavg']:.2f}" if row["ratio_to_fedavg"] is not None else "—"
            lines.append(f"| {case} | {entry['metric']} | {method} | {scores} | {row['seconds_per_run']:.3f} "
                         f"| {per_round} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from medfed.experiments.plots import curve_style

    fig = Figure(figsize=(3.6 * len(table) + 1.6, 3.4), layout="constrained")
    axes = fig.subplots(1, len(table), squeeze=False)[0]
    # one style per method across all panels (cases have different methods), so one legend reads for all
    names = list(dict.fromkeys(m for entry in table.values() for m in entry["methods"]))
    handles: dict = {}
    for ax, (case, entry) in zip(axes, table.items()):
        for method, row in entry["methods"].items():
            i = names.index(method)
            cells = sorted((float(f), cell) for f, cell in row["score"].items() if cell is not None)
            xs = [f for f, _ in cells]
            means = [cell[0] for _, cell in cells]
            stds = [cell[1] or 0.0 for _, cell in cells]
            style = curve_style(i, points=len(xs))
            if method == CEILING:  # one value, drawn across as the reference line it is
                handles[method] = ax.axhline(means[0], color="black", linestyle=":", linewidth=1.0)
                continue
            # each method's points nudged sideways (on the log axis) so that overlapping error bars stay readable
            dodge = 10 ** (0.015 * (i - len(names) / 2))
            handles[method] = ax.errorbar([x * dodge for x in xs], means, yerr=stds, capsize=3, **style)
        xs = sorted({float(f) for row in entry["methods"].values() for f, cell in row["score"].items() if cell})
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{f:g}" for f in xs])
        ax.minorticks_off()
        ax.set_xlabel("labeled fraction of training rows")
        ax.set_ylabel(f"test {entry['metric'].upper() if entry['metric'] == 'auc' else entry['metric'].title()}"
                      " (mean over sites)")
        ax.set_title(case, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1].legend([handles[m] for m in names], names, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    fig.suptitle("Few labels: mean ± 1 sample std over seeds", fontsize=9)
    fig.savefig(path, dpi=200, metadata={"Software": None})


def override_methods(known: dict[str, Case], specs: list[str]) -> dict[str, Case]:
    """Apply ``--methods CASE=m1,m2`` (e.g. semisupervised for segmentation once the run accepts it)."""
    out = dict(known)
    for spec in specs:
        name, sep, methods = spec.partition("=")
        if not sep or name not in known or not methods:
            sys.exit(f"--methods {spec!r}: expected CASE=method1,method2 with CASE one of {', '.join(known)}")
        listed = tuple(methods.split(","))
        if "fedavg" not in listed:  # every ratio and the baseline row are FedAvg's
            listed = ("fedavg", *listed)
        out[name] = replace(known[name], methods=listed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--seeds", help="comma-separated seeds instead of --repeats (sweeps run apart, then --merge)")
    parser.add_argument("--fractions", default="1,0.1,0.02")
    parser.add_argument("--cases", default="breast-cancer,mni-phantom,mni-phantom-seg")
    parser.add_argument("--methods", action="append", default=[], metavar="CASE=M1,M2",
                        help="a case's few-label methods (FedAvg is always run); repeatable")
    parser.add_argument("--rounds-scale", type=float, default=1.0, help="multiply every case's rounds")
    parser.add_argument("--n-per-site", type=int, default=150, help="mni-phantom (classification) images per site")
    parser.add_argument("--out", help="folder for few_labels.md/.json/.png (default: a temp folder)")
    parser.add_argument("--merge", metavar="JSON,JSON",
                        help="no runs: one table and plot from these few_labels.json files' runs (sweeps run apart)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="medfed-fewbench-out-")
    os.makedirs(out, exist_ok=True)
    if args.merge:
        write(merged([read_json(path) for path in args.merge.split(",")]), out)
        return
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(range(args.repeats))
    known = override_methods(cases(args.rounds_scale, args.n_per_site), args.methods)
    picked = [known[name] for name in args.cases.split(",")]
    sweep = Sweep()
    started = time.perf_counter()

    def document() -> dict:
        return {"cases": {c.name: {"flags": c.flags, "method_flags": c.method_flags(), "rounds": c.rounds,
                                   "methods": c.methods, "metric": c.metric,
                                   "fractions": case_fractions(c, fractions)} for c in picked},
                "fractions": fractions, "seeds": seeds, "wall_s": time.perf_counter() - started,
                "runs": [asdict(r) for r in sweep.runs]}

    def saved() -> None:  # the runs so far, in the format --merge reads; the final write replaces it
        with open(os.path.join(out, "few_labels.json"), "w") as fh:
            json.dump(document(), fh, indent=2)

    with tempfile.TemporaryDirectory(prefix="medfed-fewbench-") as tmp:
        for case in picked:
            sweep_case(case, seeds, fractions, tmp, sweep, saved)
    write(document(), out)


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def seeds_of(doc: dict) -> list[int]:
    return doc["seeds"] if "seeds" in doc else list(range(doc["repeats"]))  # files written before --seeds


def merged(docs: list[dict]) -> dict:
    """One document from several sweeps' (same seeds): their cases and runs, a run repeated in two sweeps
    (Mix, FedAvg of a case swept in two parts) kept once, from the first."""
    runs: dict[tuple, dict] = {}
    for doc in docs:
        for run in doc["runs"]:
            runs.setdefault((run["case"], run["method"], run["fraction"], run["seed"]), run)
    fractions = sorted({f for doc in docs for f in doc["fractions"]}, reverse=True)
    cases_: dict = {}
    for doc in docs:
        for name, case in doc["cases"].items():
            cases_.setdefault(name, case)
    return {"cases": cases_, "parts": [doc["cases"] for doc in docs], "fractions": fractions,
            "seeds": sorted({s for doc in docs for s in seeds_of(doc)}),
            "wall_s": sum(doc["wall_s"] for doc in docs), "runs": sorted(runs.values(), key=case_rank)}


def case_rank(run: dict) -> int:
    """A run's case's place in cases() (the table's and plot's order, whatever the order of --merge)."""
    order = list(cases(1.0, 1))
    return order.index(run["case"]) if run["case"] in order else len(order)


def write(doc: dict, out: str) -> None:
    """few_labels.md/.json/.png in ``out`` from a document's runs (a sweep's, or merged sweeps')."""
    sweep = Sweep([Run(**r) for r in doc["runs"]])
    metrics = {name: case["metric"] for name, case in doc["cases"].items()}
    table = summary(sweep, doc["fractions"], metrics)
    text = markdown(table, doc["fractions"], doc["seeds"]) + f"\nWall time {doc['wall_s']:.0f} s.\n"
    print("\n" + text)
    with open(os.path.join(out, "few_labels.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out, "few_labels.json"), "w") as fh:
        json.dump({**doc, "summary": table}, fh, indent=2)
    plot(table, os.path.join(out, "few_labels.png"))
    print(f"wrote few_labels.md, few_labels.json, few_labels.png to {out}")

if __name__ == "__main__":
    main()
