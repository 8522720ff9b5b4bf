"""What the deployed-study tests share: heart-disease's first three sites as a file each, and two
hospitals' PNG manifests."""

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
