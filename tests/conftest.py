import os

import numpy as np
import pytest

from medfed.data.federation import Federation, Site


def synthetic_federation(sizes=(60, 45, 30), d=5, seed=0, shift=0.5, name="synthetic") -> Federation:
    """Small sites with a shared linear signal and a per-site feature shift."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=d)
    sites = []
    for k, n in enumerate(sizes):
        X = rng.normal(size=(n, d)) + shift * k
        logits = (X - shift * k) @ beta
        y = (logits + rng.logistic(size=n) > 0).astype(int)
        sites.append(Site(f"site-{k}", X, y))
    return Federation(name, tuple(sites), tuple(f"f{j}" for j in range(d)), description="test data")


def shifted_sites(sizes=(50, 35, 20), d=4, seed=0):
    """Training data of a few sites (LocalData) whose features shift with the site index."""
    from medfed.client import LocalData

    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(sizes):
        X = rng.normal(size=(n, d)) + 0.7 * k
        y = (X[:, 0] - 0.7 * k + rng.normal(size=n) > 0).astype(float)
        out.append(LocalData(f"s{k}", X, y))
    return out


@pytest.fixture
def federation() -> Federation:
    return synthetic_federation()



# Where every extra is installed (CI sets MEDFED_REQUIRE_ALL_TESTS), a test that would be
# skipped for a missing package fails instead, so no property goes untested unnoticed.
REQUIRE_ALL = bool(os.environ.get("MEDFED_REQUIRE_ALL_TESTS"))


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if REQUIRE_ALL and skipped:
        names = ", ".join(sorted({r.nodeid or str(r.fspath) for r in skipped})[:5])
        reporter.write_line(f"MEDFED_REQUIRE_ALL_TESTS is set, but {len(skipped)} test(s) were skipped: {names}")
        session.exitstatus = 1


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy CPU their waits dominate;
    torch modules use this fixture (torch is imported only when they do)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
