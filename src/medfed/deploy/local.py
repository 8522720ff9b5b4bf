"""``medfed run ... --executor flower``: a study run on Flower's deployment runtime on this
machine, every site a SuperNode of its own on 127.0.0.1, with TLS and node authentication,
exactly as ``medfed deploy server`` and ``medfed deploy site`` would run it across hospitals.

The pooled file is cut into one file per site (the rows' text kept verbatim), test
certificates are made, and the SuperLink, the SuperNodes and the run are started and
stopped here; the coordinator writes the report into ``--out``. A deployed run is one
repeat of federated methods on each site's own file: ``--repeats 1``, no centralized
settings, no ``--loso``, ``--drop`` or ``--eval-every`` (they need rows or faults a
deployment does not have), so the same config on ``inprocess`` gives the same numbers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.errors import ConfigError

_SIMULATION_ONLY = {"out", "overwrite", "plots", "plot_formats", "workers", "executor", "ray_address", "drop", "resume",
                    "save_model", "deploy", "loso", "eval_every", "threads"}
_SOURCES = ("dataset", "path", "manifest", "npz", "options", "positive_classes", "use_val")


def check_local_flower(config) -> None:
    """What a run on the flower executor cannot do, refused in one line before anything starts."""
    problems = []
    if config.repeats != 1:
        problems.append(f"--repeats {config.repeats} (a deployment runs one repeat: --repeats 1)")
    if config.loso:
        problems.append("--loso (an unseen site would need another deployment)")
    if config.drop:
        problems.append("--drop (a deployment's dropouts are real ones)")
    if config.eval_every:
        problems.append("--eval-every (sites evaluate once, at the end)")
    if config.data.path is None and config.data.manifest is None:
        problems.append("an embedded data set (give your table with --data or your manifest with --manifest)")
    elif config.data.path is not None and Path(config.data.path).suffix.lower() not in (".csv", ".parquet", ".pq"):
        problems.append(f"table {config.data.path} (CSV or Parquet)")
    if problems:
        raise ConfigError("executor 'flower' cannot run " + "; ".join(problems))


def _site_files(config, federation, folder: Path) -> dict[str, Path]:
    """One file per site, holding that site's rows of the pooled file with their text unchanged
    (a manifest's image paths made absolute, for they were relative to the pooled file)."""
    import pandas as pd

    d = config.data
    source = Path(d.path if d.path is not None else d.manifest)
    parquet = source.suffix.lower() in (".parquet", ".pq")
    frame = pd.read_parquet(source) if parquet else pd.read_csv(source, dtype=str, keep_default_na=False)
    if d.manifest is not None:
        column = d.path_column
        frame[column] = [str(p if Path(p).is_absolute() else (source.parent / p).resolve()) for p in frame[column]]
    files = {}
    for name in federation.site_names:
        rows = frame[frame[d.site_column].astype(str) == str(name)]
        path = folder / f"{name}{'.parquet' if parquet else '.csv'}"
        rows.to_parquet(path, index=False) if parquet else rows.to_csv(path, index=False)
        files[name] = path
    return files


def _study_values(config, federation) -> dict[str, Any]:
    """The run's config as a deployed study: its data schema without a source, and [deploy]."""
    values = config.model_dump(mode="json", exclude=_SIMULATION_ONLY)
    values["data"] = {k: v for k, v in values["data"].items() if k not in _SOURCES}
    values["deploy"] = {"sites": list(federation.site_names), "round_timeout_s": 120.0,
                        "site_files": "manifest" if config.data.manifest is not None else "table"}
    return _without_none(values)


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def run_on_local_flower(config, federation, *, command: str | None = None,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``config`` on a Flower deployment on 127.0.0.1; the results document it wrote."""
    import json

    import tomli_w

    from medfed.deploy.certs import make_certs
    from medfed.deploy.launch import FAST_SITE, POLL_S
    from medfed.deploy.processes import FlowerApp, DeployError, free_port, start_superlink, start_supernode, stop_all
    from medfed.deploy.study import load_study

    check_local_flower(config)
    out = Path(config.out).absolute()
    with tempfile.TemporaryDirectory(prefix="medfed-flower-") as tmp:
        work = Path(tmp)
        files = _site_files(config, federation, work)
        study = work / "study.toml"
        study.write_bytes(tomli_w.dumps(_study_values(config, federation)).encode())
        load_study(study)  # what the coordinator will check, refused here first
        sites = list(federation.site_names)
        keys = make_certs(work / "certs", sites)
        started: list = []
        try:
            superlink = start_superlink(keys, out / "flower", port=free_port(), task_poll_s=FAST_SITE["task_poll_s"])
            started.append(superlink)
            superlink.register({s: keys.site(s).public_key for s in sites})
            for s in sites:
                started.append(start_supernode(s, keys, superlink.address, out / "flower", port=free_port(),
                                               node_config={"data": str(files[s]), "folder": str(work / f"site-{s}"),
                                                            "workdir": str(Path.cwd())},  # --teacher as in medfed run
                                               **FAST_SITE))
            log(f"Flower on 127.0.0.1: a SuperLink and {len(sites)} SuperNodes (TLS, node authentication)")
            app = FlowerApp({"program": "study", "study": str(study), "out": str(out), "poll-s": POLL_S,
                             "join-timeout-s": 300.0, "command": command or ""})
            status = superlink.wait_run(superlink.start_run(app), 7 * 24 * 3600.0)
            if not status.ok:
                raise DeployError(f"the run on Flower did not finish: {status}")
        finally:
            stop_all(started)
    return json.loads((out / "results.json").read_text())
