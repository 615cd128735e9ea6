"""Write the bundled digits as image files: an ImageFolder tree and/or a Knowledge Evolution lists/ layout.

    python tools/digits_to_folder.py OUT [--layout imagefolder|lists|both]

The images are the 8x8 originals as grayscale PNGs (value v in 0..16 -> round(v * 255 / 16)), split
exactly as ``slimkit.data.digits(seed=0)`` splits them and kept in the same order inside each class,
so ``--train-per-class K`` picks the same images on every path. ``OUT/folder/{train,test}/<class>/``
holds the ImageFolder tree, ``OUT/lists/`` + ``OUT/lists/images/`` the KE layout.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def write(out: Path, layout: str = "both") -> dict[str, Path]:
    from PIL import Image

    from slimkit.data.digits import _digits_arrays, digits_split

    images, labels = _digits_arrays()
    px = np.rint(images.astype(np.float64) * 255 / 16).astype(np.uint8)  # (N, 8, 8)
    in_test = digits_split(labels, seed=0)
    roots = {}
    if layout in ("imagefolder", "both"):
        root = out / "folder"
        for split, pick in (("train", ~in_test), ("test", in_test)):
            for i in np.flatnonzero(pick):
                d = root / split / str(int(labels[i]))
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(px[i], mode="L").save(d / f"{i:04d}.png")  # zero-padded: sorted = original order
        roots["imagefolder"] = root
    if layout in ("lists", "both"):
        root = out / "lists_layout"
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "lists").mkdir(exist_ok=True)
        for name, pick in (("trn", ~in_test), ("tst", in_test)):
            with open(root / "lists" / f"{name}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["file_name", "label"])
                for i in np.flatnonzero(pick):
                    Image.fromarray(px[i], mode="L").save(root / "images" / f"{i:04d}.png")
                    w.writerow([f"images/{i:04d}.png", int(labels[i])])
        roots["lists"] = root
    return roots


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--layout", default="both", choices=("imagefolder", "lists", "both"))
    args = p.parse_args()
    for kind, root in write(Path(args.out), args.layout).items():
        print(f"{kind}: {root}")


if __name__ == "__main__":
    main()
