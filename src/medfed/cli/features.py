"""``medfed features``: turn image files into the feature tables ``medfed run --data`` reads.

``medfed features roi`` is the survey's pipeline (§6.1): per subject, the mean value of the
image in every atlas region (:mod:`medfed.data.roi`), written as Parquet or CSV.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from medfed.cli.common import CONTEXT, console, err_console, guard, progress_steps, show, write_results
from medfed.errors import ConfigError

features_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
    help="Feature tables from images: `medfed features roi` extracts atlas-region means.",
)

PARQUET_OUT = (".parquet", ".pq")
CSV_OUT = (".csv", ".tsv")


def table_bytes(df, out: Path) -> bytes:
    """The table as Parquet (keeping each row's image path as its index) or CSV/TSV.

    CSV has no place for the index that ``medfed run`` would not read as a feature column,
    so CSV/TSV files hold the site, label, split and region columns only.
    """
    suffix = out.suffix.lower()
    if suffix in PARQUET_OUT:
        buf = io.BytesIO()
        df.to_parquet(buf)
        return buf.getvalue()
    return df.to_csv(index=False, sep="\t" if suffix == ".tsv" else ",", lineterminator="\n").encode()


def execute_roi(args: dict[str, Any], out: Path) -> None:
    """Check the output name and its folder, extract with a progress bar, write atomically,
    summarize."""
    from medfed.data.images.manifest import read_manifest
    from medfed.data.roi import extract_roi_features
    from medfed.experiments.report import output_dir, write_atomically

    if out.suffix.lower() not in PARQUET_OUT + CSV_OUT:
        raise ConfigError(f"--out must end in {', '.join(PARQUET_OUT + CSV_OUT)} (Parquet or CSV), got {out.name!r}")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name ending in .parquet or .csv")
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {out} is a symbolic link to {os.readlink(out)!r}, which does not exist")
    # the table goes next to the user's other files: it replaces one file, not a run's set
    with output_dir(out.parent, "--out's folder"):
        columns = {k: args[k] for k in ("path_column", "label_column", "site_column", "split_column", "positive_label")}
        total = len(read_manifest(args["manifest_path"], **columns).paths)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with progress_steps(total) as step:
                df = extract_roi_features(**args, progress=step)
        written = write_results(
            lambda: write_atomically(out.parent, {out.name: lambda: table_bytes(df, out)}, as_set=False), out.parent
        )
    show(lambda: render_summary(df, written[0]), str(out))
    for w in caught:
        if not issubclass(w.category, UserWarning):
            continue  # library deprecation notes are not the user's business here
        err_console.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)


def render_summary(df, out: Path) -> None:
    attrs = df.attrs
    skipped = attrs.get("skipped", [])
    skipped_by_site: dict[str, int] = {}
    for s in skipped:
        skipped_by_site[s["site"]] = skipped_by_site.get(s["site"], 0) + 1
    n_regions = len(attrs.get("region_ids", []))
    console.print(f"ROI features: {n_regions} regions ({attrs.get('strategy')}) of {attrs.get('atlas')}",
                  highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("Site", no_wrap=True)
    for col in ("Subjects", "Skipped"):
        table.add_column(col, justify="right")
    counts = df["site"].value_counts(sort=False)
    order = list(dict.fromkeys(list(counts.index) + list(skipped_by_site)))
    for site in order:
        table.add_row(str(site), str(int(counts.get(site, 0))), str(skipped_by_site.get(site, 0)))
    table.add_section()
    table.add_row("all", str(len(df)), str(len(skipped)))
    console.print(table)
    for s in skipped[:5]:
        console.print(f"[dim]skipped row {s['row']}: {s['reason']}[/]", highlight=False, soft_wrap=True)
    if len(skipped) > 5:
        console.print(f"[dim]... and {len(skipped) - 5} more skipped[/]", highlight=False)
    partial = attrs.get("partial", {})
    if partial:
        console.print(f"[dim]{len(partial)} image(s) cover some region only partly; their values use the covered "
                      "voxels[/]", highlight=False)
    hint = f"medfed run --data {out} --site-column site --label-column label"
    if "split" in df.columns:
        hint += " --split-column split"
    labels = {str(v) for v in df["label"].tolist()}
    if labels != {"0", "1"} and attrs.get("positive_label") is not None:
        hint += f" --positive-label {attrs['positive_label']}"
    console.print(f"wrote {len(df)} rows × {n_regions} regions to {out}", highlight=False, soft_wrap=True)
    console.print(f"[dim]next: {hint}[/]", highlight=False, soft_wrap=True)


@features_app.command("roi")
def roi(
    manifest: Annotated[Path, typer.Option(help="CSV/Parquet manifest: one row per subject image (path, label, site[, split])")],
    atlas: Annotated[Path, typer.Option(help="NIfTI label image, 0 = background (e.g. /usr/share/mricron/templates/aal.nii.gz)")],
    out: Annotated[Path, typer.Option(help="output table: .parquet or .csv")],
    labels: Annotated[Path | None, typer.Option(help="region names: 'id name' lines, mricron .nii.txt, ROI_MNI_V4.txt or CSV with id,name")] = None,
    regions: Annotated[str | None, typer.Option(help="region ids to keep, e.g. 1-90 (AAL's cerebral regions) or 1-90,95")] = None,
    strategy: Annotated[str, typer.Option(help="mean, median, or volume (sum × voxel mm³)")] = "mean",
    path_column: Annotated[str, typer.Option(help="manifest column with each image file")] = "path",
    label_column: Annotated[str, typer.Option(help="manifest column with the label")] = "label",
    site_column: Annotated[str, typer.Option(help="manifest column with the site")] = "site",
    split_column: Annotated[str | None, typer.Option(help="manifest column with train/test")] = None,
    positive_label: Annotated[str | None, typer.Option(help="label value that counts as positive (labels not 0/1)")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="skip bad image files (counted) instead of stopping")] = False,
) -> None:
    """Per subject, the image's mean in each atlas region (resampled to the atlas grid): one row per subject."""
    args = {
        "manifest_path": manifest, "atlas_path": atlas, "labels": labels, "regions": regions, "strategy": strategy,
        "path_column": path_column, "label_column": label_column, "site_column": site_column,
        "split_column": split_column, "positive_label": positive_label, "skip_bad": skip_bad,
    }
    guard(execute_roi, args, out)
