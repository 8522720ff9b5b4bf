"""Writing results: JSON, CSV, Markdown (and PNG plots), all or nothing.

Every file is first written under a temporary name in the output folder and renamed into
place only after all of them were written, so a failed run leaves no partial result files.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.experiments.metrics import METRICS
from medfed.experiments.results import communication_lines, data_note_lines, server_note_lines, table_rows


def results_csv(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["setting", "evaluation", "model", "train_site", "test_site", "computable", "reason"]
    for m in METRICS:
        header += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    writer.writerow(header)
    for r in doc["results"]:
        line = [r["setting"], r["evaluation"], r["model"], r["train_site"] or "", r["test_site"], r["computable"],
                r["reason"] or ""]
        for m in METRICS:
            s = r["metrics"][m]
            line += ["" if s["mean"] is None else repr(s["mean"]), "" if s["std"] is None else repr(s["std"]), s["n"]]
        writer.writerow(line)
    return buf.getvalue()


def results_markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# Results: {doc['dataset']}",
        "",
        f"{doc['description']}".strip(),
        "",
        f"Split: {doc['split']}, {doc['repeats']} repeat(s), seed {doc['seed']}; scaling: {doc['scaling']}. "
        f"Values are mean ± sample standard deviation over repeats.",
        "",
        "| Test site | Setting | ACC | SEN | SPE | AUC |",
        "|---|---|---|---|---|---|",
    ]
    footnotes = []
    for row in table_rows(doc):
        label = row["label"]
        if row["notes"]:
            footnotes.append(f"{row['test_site']} / {label}: " + "; ".join(row["notes"]))
            label += f" [{len(footnotes)}]"
        lines.append(f"| {row['test_site']} | {label} | " + " | ".join(row["cells"]) + " |")
    if footnotes:
        lines += ["", *[f"[{i}] {text}" for i, text in enumerate(footnotes, 1)]]
    data_notes = data_note_lines(doc)
    if data_notes:
        lines += ["", "Data:", *[f"- {line.strip()}" for line in data_notes]]
    communication = communication_lines(doc)
    if communication:
        lines += ["", "Communication:", *[f"- {line}" for line in communication]]
    server = server_note_lines(doc)
    if server:
        lines += ["", "Server:", *[f"- {line}" for line in server]]
    if doc["warnings"]:
        lines += ["", "Warnings:", *[f"- {w}" for w in doc["warnings"]]]
    if doc.get("attribution"):
        lines += ["", f"Data: {doc['attribution']}"]
    return "\n".join(lines) + "\n"


def write_atomically(out_dir: Path, files: dict[str, Callable[[], bytes]]) -> list[Path]:
    """Produce every file's bytes, write them under temporary names, then rename them all.

    If producing or writing any file fails, every temporary file is removed and no result
    file is touched.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, produce in files.items():
            final = out_dir / name
            tmp = out_dir / f".{name}.tmp-{os.getpid()}"
            data = produce()
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            staged.append((tmp, final))
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for leftover in out_dir.glob(f".*.tmp-{os.getpid()}"):
            leftover.unlink(missing_ok=True)  # a file whose write failed half-way
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    return [final for _, final in staged]


def report_files(doc: dict[str, Any], run=None, plots: bool = False) -> dict[str, Callable[[], bytes]]:
    """The files of a run's report, as producers of their bytes."""
    files: dict[str, Callable[[], bytes]] = {
        "results.json": lambda: (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode(),
        "results.csv": lambda: results_csv(doc).encode(),
        "table.md": lambda: results_markdown(doc).encode(),
    }
    if plots and run is not None:
        from medfed.experiments import plots as plotting

        files.update(plotting.plot_files(run, doc))
    return files
