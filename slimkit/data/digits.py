"""The bundled 8x8 handwritten digits (scikit-learn's, shipped in the package)."""
from __future__ import annotations

from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from slimkit.core.errors import SlimkitError


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    with resources.files("slimkit").joinpath("_data/digits.npz").open("rb") as f:
        d = np.load(f)
        return d["images"], d["labels"]  # (1797, 8, 8) uint8 in 0..16, (1797,) int64


def digits_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Which items are in the test split: a seeded, stratified ``test_fraction`` of every class."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test_idx.extend(rng.permutation(idx)[: round(test_fraction * len(idx))])
    in_test = np.zeros(len(labels), dtype=bool)
    in_test[test_idx] = True
    return in_test


def digits(split: str = "train", image_size: int = 8, in_chans: int = 1, test_fraction: float = 0.2,
           seed: int = 0) -> TensorDataset:
    """The digits set as tensors: images (N, in_chans, S, S) scaled to [-1, 1], labels (N,).

    The train/test split is stratified and seeded: the same seed gives the same split everywhere.
    """
    if split not in ("train", "test"):
        raise SlimkitError(f"digits split must be 'train' or 'test', got {split!r}")
    if image_size < 1 or in_chans < 1:
        raise SlimkitError(f"digits: image_size and in_chans must be positive, got {image_size}, {in_chans}")
    images, labels = _digits_arrays()
    in_test = digits_split(labels, test_fraction, seed)
    pick = in_test if split == "test" else ~in_test
    x = torch.from_numpy(images[pick]).float().div_(16).mul_(2).sub_(1).unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if in_chans != 1:
        x = x.expand(-1, in_chans, -1, -1).contiguous()
    return TensorDataset(x, torch.from_numpy(labels[pick]))


DIGITS_MEAN, DIGITS_STD = (0.5,), (0.5,)  # digits: v/16 in [0, 1] -> [-1, 1]
