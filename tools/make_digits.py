"""Write slimkit/_data/digits.npz from scikit-learn's bundled 8x8 handwritten digits.

The package ships the result so that neither tests nor users need scikit-learn or a download.
Run once: `python tools/make_digits.py` (needs scikit-learn).
"""
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits


def main() -> None:
    d = load_digits()
    images = d.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    labels = d.target.astype(np.int64)  # (1797,)
    out = Path(__file__).resolve().parents[1] / "slimkit" / "_data" / "digits.npz"
    np.savez_compressed(out, images=images, labels=labels)
    print(f"wrote {out} ({out.stat().st_size} bytes): {images.shape[0]} images, {len(set(labels))} classes")


if __name__ == "__main__":
    main()
