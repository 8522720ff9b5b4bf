"""DESIGN.md's rule, checked: imports between medfed's layers point down only."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "medfed"
# bottom to top; errors, rng, wiretypes and atomic are shared vocabulary below every layer
LAYERS = ["errors", "rng", "wiretypes", "atomic", "data", "models", "client", "comm", "server", "engine", "methods",
          "experiments", "deploy", "cli"]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "medfed" and parts[1] in LAYERS else None


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    own = _layer("medfed." + ".".join(path.relative_to(SRC).with_suffix("").parts))
    if own is None:
        return
    for module in _imports(path):
        other = _layer(module)
        if other is not None:
            assert LAYERS.index(other) <= LAYERS.index(own), f"{path.name} ({own}) imports {module} ({other})"


def test_starting_the_command_line_does_not_load_slow_scipy_modules():
    """`medfed reproduce` must start in well under its 2 s budget: scipy.stats and scipy.spatial
    (about 0.7 s together) load only when an aggregator that needs them runs."""
    import subprocess
    import sys

    code = "import sys, medfed.cli.app; print(sorted(m for m in sys.modules if m.startswith(('scipy.stats', 'scipy.spatial', 'scipy.fft', 'flwr', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
