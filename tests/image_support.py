"""What the image-model tests share: a tiny PNG classification manifest."""

import numpy as np


def png_classification(folder):
    """Two hospitals' 12 grey 10x10 PNGs each (a bright square on label 1; hospital 1 darker),
    listed in ``folder/manifest.csv`` (path, label, site); returns that path."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["path,label,site"]
    for k in range(2):
        for i in range(12):
            img = rng.normal(100 - 30 * k, 10, size=(10, 10))
            img[2:5, 2:5] += 60 * (i % 2)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(folder / f"s{k}_{i}.png")
            rows.append(f"s{k}_{i}.png,{i % 2},hospital-{k}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"
