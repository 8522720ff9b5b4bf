"""What the deployed-study tests share: heart-disease's first three sites as a file each, a study
of them, and two hospitals' PNG manifests."""

import json

import numpy as np
import pandas as pd

from medfed.data.datasets import load_dataset


def site_tables(root, column: str = "target", label_of=None) -> tuple[str, ...]:
    """heart-disease's first three sites as one CSV each and pooled (``all.csv``) under ``root``;
    ``column`` holds the 0/1 target, or ``label_of(site name, features, target)`` in its place.
    Returns the site names."""
    fed = load_dataset("heart-disease")
    frames = []
    for s in fed.sites[:3]:
        df = pd.DataFrame(s.X, columns=list(fed.feature_names))
        df.insert(0, "site", s.name)
        target = s.y.astype(int)
        df[column] = target if label_of is None else label_of(s.name, df, target)
        df.to_csv(root / f"{s.name}.csv", index=False)
        frames.append(df)
    pd.concat(frames).to_csv(root / "all.csv", index=False)
    return tuple(s.name for s in fed.sites[:3])


HEART_SITES = ("Cleveland", "Hungary", "Switzerland")


def heart_study(methods, *, data: str = 'label_column = "target"', options: dict[str, str] | None = None,
                seed: int = 3, sites=HEART_SITES) -> str:
    """A deployed study (TOML) of the site tables :func:`site_tables` writes: ``methods`` for 3 rounds
    of 4 local steps, ``data`` the [data] lines after the site column and imputation, ``options``
    each method's [method_options.NAME] lines."""
    sections = "".join(f"[method_options.{name}]\n{body}\n" for name, body in (options or {}).items())
    return f"""methods = {json.dumps(list(methods))}
seed = {seed}
repeats = 1
[training]
rounds = 3
local_steps = 4
[data]
site_column = "site"
impute = "median"
{data}
{sections}[deploy]
sites = {json.dumps(list(sites))}
round_timeout_s = 5
"""


def site_manifests(root, unlabeled=()) -> tuple[str, ...]:
    """Two hospitals' 10x10 PNG images (14 each, label i % 2; a brighter square marks class 1) as one
    manifest each and pooled (``all.csv``) under ``root``; the images numbered in ``unlabeled`` have an
    empty label cell. Returns the site names."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"hospital-0": [], "hospital-1": []}
    for k, site in enumerate(rows):
        for i in range(14):
            img = rng.normal(100 - 30 * k, 10, size=(10, 10))
            img[2:5, 2:5] += 60 * (i % 2)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(root / f"{site}_{i}.png")
            rows[site].append(f"{site}_{i}.png,{'' if i in unlabeled else i % 2},{site}")
    for site, lines in rows.items():
        (root / f"{site}.csv").write_text("path,label,site\n" + "\n".join(lines) + "\n")
    (root / "all.csv").write_text("path,label,site\n" + "\n".join(rows["hospital-0"] + rows["hospital-1"]) + "\n")
    return tuple(rows)
