"""Fixed costs at scale (issue 13 §3): what a run of many sites pays outside training. The
terminal shows the first and last rows of a long table and says what it left out (the files
keep every row); the table is built in one pass over the results, not one per test site.
Partitions reach the data's limit (a Dirichlet split of breast-cancer up to 56 sites of 10
rows) and say past it what the limit is and why. Torch runs step Adam with torch.optim.Adam's
bits but without importing torch._dynamo (0.7 s)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.app import SCREEN_ROWS, app
from medfed.data.federation import MIN_SITE_SAMPLES
from medfed.data.partition import dirichlet_label_partition, dirichlet_label_split
from medfed.errors import ConfigError
from medfed.experiments.results import table_rows

runner = CliRunner()


def _shown_sites(text: str) -> list[str]:
    return re.findall(r"│ (site-\d+) ", text)


def test_a_long_table_shows_its_first_and_last_rows_and_says_where_the_rest_are(tmp_path):
    n = SCREEN_ROWS + 10
    result = runner.invoke(app, ["run", "--dataset", "synthetic", "--dataset-option", f"n_sites={n}", "--methods",
                                 "fedavg", "--rounds", "1", "--local-steps", "1", "--repeats", "1",
                                 "--out", str(tmp_path)], terminal_width=120)
    assert result.exit_code == 0, result.output
    half = SCREEN_ROWS // 2
    want = [f"site-{k}" for k in [*range(1, half + 1), *range(n - half + 1, n + 1)]]
    assert _shown_sites(result.output) == want
    line = " ".join(result.output.split())  # the note may wrap
    assert (f"rows {half + 1}-{n - half} of {n} not shown (10 test site(s): site-{half + 1} ... site-{n - half}"
            in line), result.output
    assert "every row is in table.md, results.csv and results.json" in line
    markdown = (tmp_path / "table.md").read_text()
    assert all(f"| site-{k} | FedAvg" in markdown for k in range(1, n + 1))
    assert len(json.loads((tmp_path / "results.json").read_text())["results"]) == n


class _CountingList(list):
    """A list that counts how often it is read from the start."""

    reads = 0

    def __iter__(self):
        type(self).reads += 1
        return super().__iter__()


def test_the_table_reads_the_results_once_not_once_per_test_site():
    sites = [f"site-{k}" for k in range(1, 41)]
    metrics = {"acc": {"mean": 0.5, "std": None, "values": [0.5], "n": 1}}
    rows = [{"setting": setting, "method": setting.lower(), "evaluation": "split", "model": "global",
             "train_site": None, "test_site": site, "computable": True, "reason": None, "diverged": [],
             "warnings": [], "metrics": metrics}
            for setting in ("FedProx", "FedAvg") for site in reversed(sites)]
    doc = {"task": "binary", "sites": [{"name": s} for s in sites], "results": _CountingList(rows),
           "methods": [{"display": "FedAvg", "caveat": None}, {"display": "FedProx", "caveat": None}]}
    table = table_rows(doc, ("acc",))
    assert _CountingList.reads == 1
    # Table 2 order: by test site as the federation lists them, then the settings in run order
    assert [(r["test_site"], r["label"]) for r in table] == [(s, m) for s in sites for m in ("FedAvg", "FedProx")]


# --------------------------------------------------------------------------- partitions up to the data's limit


def _dirichlet_federation(n_sites):
    from medfed.data.datasets.breast_cancer import load_breast_cancer_federation

    return load_breast_cancer_federation(n_sites=n_sites, partition="dirichlet", alpha=0.5, seed=0)


@pytest.mark.parametrize("n_sites", [16, 56])
def test_a_dirichlet_split_of_breast_cancer_reaches_the_datas_limit_and_says_what_it_moved(n_sites):
    fed = _dirichlet_federation(n_sites)
    sizes = [s.y.size for s in fed.sites]
    assert len(sizes) == n_sites and sum(sizes) == 569 and min(sizes) >= MIN_SITE_SAMPLES
    moved = fed.info["rows_moved"]
    assert moved > 0 and f"{moved} rows were moved" in fed.description
    # still label-skewed: the sites' malignant shares spread far wider than an IID split's
    pooled = np.mean(np.concatenate([s.y for s in fed.sites]))
    assert np.mean([abs(s.y.mean() - pooled) for s in fed.sites]) > 0.15


def test_a_split_that_meets_the_minimum_as_drawn_is_unchanged():
    from medfed.data.datasets.breast_cancer import read_breast_cancer

    fed = _dirichlet_federation(3)
    y = (1 - read_breast_cancer()[1]).astype(np.int8)
    parts = dirichlet_label_partition(y, 3, 0.5, 0, min_size=MIN_SITE_SAMPLES)
    assert fed.info["rows_moved"] == 0 and "moved" not in fed.description
    assert [s.y.tolist() for s in fed.sites] == [y[p].tolist() for p in parts]


def test_top_up_moves_exactly_the_missing_rows_from_sites_above_the_minimum():
    y = np.r_[np.zeros(60, int), np.ones(40, int)]
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    with pytest.raises(ConfigError):
        dirichlet_label_split(y, 10, 0.1, rng_a, min_size=10, max_tries=5)
    split = dirichlet_label_split(y, 10, 0.1, rng_b, min_size=10, max_tries=5, top_up=True)
    assert sorted(np.concatenate(split.parts).tolist()) == list(range(100))
    assert [p.size for p in split.parts] == [10] * 10  # 100 rows, 10 sites: the limit exactly
    assert split.moved > 0


def test_past_the_limit_the_message_says_the_limit_and_why():
    from medfed.data.datasets.breast_cancer import load_breast_cancer_federation

    for partition in ("dirichlet", "iid", "quantity"):
        with pytest.raises(ConfigError, match=r"at most 56 sites keep 10 rows each \(a site needs 10 rows"):
            load_breast_cancer_federation(n_sites=57, partition=partition)
    with pytest.raises(ConfigError, match=r"at most 10 sites \(n // 10\)"):
        dirichlet_label_split(np.zeros(100, int), 11, 0.5, 0, min_size=10, top_up=True)


# --------------------------------------------------------------------------- torch fixed costs


class _Session:
    def __init__(self, values):
        self.values = values


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_adam_is_torch_optim_adams_single_tensor_path_bit_for_bit(dtype):
    torch = pytest.importorskip("torch")
    from medfed.client.optimizer import Adam

    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dtype)
    start = {"w": torch.randn(4, 3, 3, generator=gen, dtype=dtype), "b": torch.randn(4, generator=gen, dtype=dtype)}
    ours = {k: v.clone() for k, v in start.items()}
    theirs = {k: v.clone() for k, v in start.items()}
    adam, reference = Adam(_Session(ours), 0.01), torch.optim.Adam(list(theirs.values()), lr=0.01, foreach=False)
    no_terms = {k: () for k in start}
    for _ in range(25):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=dtype) * 10 for k, v in start.items()}
        adam.step(ours, {k: g.clone() for k, g in grads.items()}, no_terms)
        for k, p in theirs.items():
            p.grad = grads[k].clone()
        reference.step()
        for k in start:
            assert torch.equal(ours[k], theirs[k]), k


def test_a_torch_run_with_adam_does_not_import_torch_dynamo(tmp_path):
    pytest.importorskip("torch")
    code = f"""
import sys
from typer.testing import CliRunner
from medfed.cli.app import app
result = CliRunner().invoke(app, ["run", "--dataset", "mni-phantom", "--model", "cnn2d", "--methods", "fedavg",
                                  "--rounds", "1", "--local-steps", "1", "--repeats", "1", "--out", {str(tmp_path)!r}])
assert result.exit_code == 0, result.output
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "False", out.stdout + out.stderr


def test_cross_over_many_sites_is_refused_in_one_line():
    from medfed.data.datasets import load_dataset
    from medfed.errors import ConfigError
    from medfed.experiments.config import build_config
    from medfed.experiments.harness import CROSS_SITE_LIMIT, run_experiment

    n = CROSS_SITE_LIMIT + 1
    values = {"data": {"dataset": "synthetic", "options": {"n_sites": n}}, "methods": ["single", "cross"],
              "repeats": 1, "training": {"rounds": 1, "local_steps": 1}}
    with pytest.raises(ConfigError, match=f"{n} sites make {n * (n - 1):,} model-site pairs"):
        run_experiment(build_config(values), load_dataset("synthetic", n_sites=n))
