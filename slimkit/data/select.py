"""The training and test splits a training verb reads (digits or a directory), and seeded per-class subsets."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from slimkit.core.errors import SlimkitError
from slimkit.data.loading import labels_of


def datasets(data: str, in_chans: int, image_size: int, train_per_class: int | None = None,
             subset_seed: int = 0, augment: str = "auto", workers: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) for "digits" (bundled) or a dataset directory (ImageFolder or KE lists).

    ``augment`` is a preset of :data:`slimkit.data.AUGMENTS` (or auto) for the training split. The
    training split carries ``preprocess`` (what checkpoints record) and ``batch_augment`` (the
    digits' own batch shift, or None when the items are augmented one by one).
    """
    from slimkit.data.augment import Augmented, preprocess_meta, resolve_augment
    from slimkit.data.digits import DIGITS_MEAN, DIGITS_STD, digits
    from slimkit.data.images import check_same_classes, image_dir

    preset = resolve_augment(augment, image_size)
    batch_aug = None
    if data == "digits":
        train = digits("train", image_size=image_size, in_chans=in_chans, seed=0)
        test = digits("test", image_size=image_size, in_chans=in_chans, seed=0)
        if train_per_class is not None:
            train = per_class_subset(train, train_per_class, subset_seed)
        if preset == "shift":
            batch_aug = shift_augment  # the digits' own shift (a batch rolled together), as every recorded result
        elif preset != "none":
            x, y = (train.dataset.tensors if isinstance(train, Subset) else train.tensors)
            pick = torch.as_tensor(train.indices) if isinstance(train, Subset) else torch.arange(len(y))
            train = Augmented(TensorDataset(x[pick], y[pick]), preset)
            train.workers = workers
        train.preprocess = preprocess_meta(preset, "bilinear", DIGITS_MEAN * in_chans, DIGITS_STD * in_chans)
    else:
        shape = (in_chans, image_size, image_size)
        train = image_dir(data, shape, "train", augment=preset, workers=workers)
        test = image_dir(data, shape, "test", workers=workers)
        check_same_classes(data, train, test)
        if train_per_class is not None:
            train = per_class_subset(train, train_per_class, subset_seed)
        train, test = train.prepare(), test.prepare()  # every file read (and cached) before anything is written
    train.batch_augment = batch_aug
    return train, test


def num_classes_of(train: Dataset, test: Dataset, expected: int | None = None) -> int:
    """Classes of a dataset; refuses a training split that lacks some of the test split's classes, and
    a class count other than ``expected`` (the user's --num-classes) when one is given."""
    tr, te = labels_of(train).unique(), labels_of(test).unique()
    n = int(max(int(tr.max()), int(te.max()))) + 1
    if expected is not None and n != expected:
        raise SlimkitError(f"the data has {n} classes, {'fewer' if n < expected else 'more'} than "
                           f"--num-classes {expected}; check --data or drop --num-classes to use the data's count")
    missing = sorted(set(range(n)) - set(tr.tolist()))
    if missing:
        raise SlimkitError(f"the training split has no example of class {missing[0]} "
                           f"({len(missing)} of {n} classes missing); every class needs training data")
    return n


def per_class_subset(ds: Dataset, k: int, seed: int) -> Dataset:
    """A seeded subset with at most ``k`` items of every class (image sets keep their decoded pixels)."""
    labels = labels_of(ds)
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        idx += members[torch.randperm(len(members), generator=g)[:k]].tolist()
    return ds.subset(sorted(idx)) if hasattr(ds, "subset") else Subset(ds, sorted(idx))


def shift_augment(x: torch.Tensor) -> torch.Tensor:
    """Random shifts of up to 1/8 of the image: the light augmentation for small digit images."""
    s = max(1, x.shape[-1] // 8)
    dx, dy = torch.randint(-s, s + 1, (2,)).tolist()
    return torch.roll(x, shifts=(dx, dy), dims=(2, 3))
