"""Datasets. For now: the bundled 8x8 handwritten digits (scikit-learn's, shipped in the package)."""
from __future__ import annotations

from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from slimkit.errors import SlimkitError

__all__ = ["digits"]


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


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _ListDataset(torch.utils.data.Dataset):
    """(path, label) pairs read with PIL and transformed on access."""

    def __init__(self, items: list[tuple[str, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            return self.transform(im.convert("RGB")), label


def _transform(input_shape: tuple[int, ...], augment: bool = False):
    """Evaluation: resize + center crop. Training (``augment``): RandomResizedCrop + horizontal flip."""
    from torchvision import transforms as T

    c, h, w = input_shape
    if c != 3:
        raise SlimkitError(f"image folders give RGB images; this network reads {c} channels")
    geometry = ([T.RandomResizedCrop((h, w)), T.RandomHorizontalFlip()] if augment
                else [T.Resize(round(h * 256 / 224)), T.CenterCrop((h, w))])
    return T.Compose([*geometry, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def image_dir(root: str, input_shape: tuple[int, ...], split: str = "test",
              augment: bool = False) -> torch.utils.data.Dataset:
    """Evaluation images from a directory, resized/cropped to ``input_shape``, ImageNet-normalised.

    Layouts: the Knowledge Evolution one (``lists/{trn,val,tst}.csv`` with ``file_name,label``),
    or an ImageFolder tree (``test/`` or ``val/`` or ``train/`` holding one folder per class).
    """
    import csv
    from pathlib import Path

    root_p = Path(root)
    if not root_p.is_dir():
        raise SlimkitError(f"dataset directory {root} does not exist" if not root_p.exists() else f"{root} is not a directory")
    tf = _transform(tuple(input_shape), augment)
    csv_name = {"train": "trn", "val": "val", "test": "tst"}[split]
    lst = root_p / "lists" / f"{csv_name}.csv"
    if lst.is_file():
        items = []
        with open(lst, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    path, label = root_p / row["file_name"], int(row["label"])
                except (KeyError, ValueError, TypeError):
                    raise SlimkitError(f"{lst}: each row needs file_name and an integer label") from None
                if not path.is_file():
                    raise SlimkitError(f"{lst} names {row['file_name']}, which does not exist under {root}")
                if label < 0:
                    raise SlimkitError(f"{lst}: label {label} of {row['file_name']} is negative; labels are 0..C-1")
                items.append((str(path), label))
        if not items:
            raise SlimkitError(f"{lst} lists no images")
        return _ListDataset(items, tf)
    for sub in ([split] + (["val"] if split == "test" else [])):
        if (root_p / sub).is_dir():
            from torchvision.datasets import ImageFolder

            try:
                return ImageFolder(str(root_p / sub), transform=tf)
            except (FileNotFoundError, RuntimeError) as exc:
                raise SlimkitError(f"{root_p / sub}: {exc}") from None
    raise SlimkitError(f"{root} has neither lists/{csv_name}.csv nor a {split}/ (or val/) folder of class folders")


def eval_dataset(data: str, input_shape: tuple[int, ...], meta: dict | None = None,
                 num_classes: int | None = None) -> torch.utils.data.Dataset:
    """The evaluation split named by a CLI ``--data`` value: 'digits' or a directory.

    With ``num_classes`` (the network's outputs) the labels must fit: an ImageFolder split needs
    one folder per class (it numbers folders in sorted order, so a missing one shifts the rest).
    """
    c, h, w = input_shape
    if data == "digits":
        if h != w:
            raise SlimkitError(f"digits images are square; this network reads {h}x{w}")
        seed = int(((meta or {}).get("data") or {}).get("split_seed", 0))
        ds = digits("test", image_size=h, in_chans=c, seed=seed)
    else:
        ds = image_dir(data, input_shape, "test")
    if num_classes is not None:
        folders = getattr(ds, "classes", None)
        if folders is not None and len(folders) != num_classes:
            raise SlimkitError(f"{data}: the test split has {len(folders)} class folders but the network has "
                               f"{num_classes} classes; folders are numbered in sorted order, so every class "
                               "needs one")
        top = int(labels_of(ds).max())
        if top >= num_classes:
            raise SlimkitError(f"{data}: label {top} does not exist in a network with {num_classes} classes")
    return ds


def labels_of(ds) -> torch.Tensor:
    """The label of every item of a slimkit dataset (TensorDataset, ImageFolder, list, Subset), without loading images."""
    if isinstance(ds, torch.utils.data.Subset):
        return labels_of(ds.dataset)[torch.as_tensor(ds.indices)]
    if hasattr(ds, "tensors"):
        return ds.tensors[1]
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets)
    if hasattr(ds, "items"):
        return torch.as_tensor([lab for _, lab in ds.items])
    raise TypeError(f"cannot read the labels of {type(ds).__name__}")
