"""Fixed costs at scale (issue 13 §3): what a run of many sites pays outside training. The
terminal shows the first and last rows of a long table and says what it left out (the files
keep every row); the table is built in one pass over the results, not one per test site."""

import json
import re

from typer.testing import CliRunner

from medfed.cli.app import SCREEN_ROWS, app
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
