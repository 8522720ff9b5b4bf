"""What the deployed-study tests share: heart-disease's first three sites as a file each."""

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
