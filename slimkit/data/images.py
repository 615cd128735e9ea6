"""Image directories: ImageFolder trees and the Knowledge Evolution lists/ layout, read as `Images`.

They are decoded once
into uint8 tensors when they fit in memory; training augmentation (a torchvision preset) runs per
item on those tensors, seeded from (epoch seed, item), in as many loader processes as asked.
"""
from __future__ import annotations

import torch

from slimkit.core.errors import SlimkitError
from slimkit.data.augment import (
    _geometry,
    _seeded,
    preprocess_meta,
    resize_policy,
    resolve_augment,
)
from slimkit.data.digits import digits
from slimkit.data.loading import SeededItems, default_workers, labels_of

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


CACHE_BYTES = 1 << 30  # image sets whose decoded uint8 pixels fit in this are decoded once and kept in memory


LOSSLESS_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")  # PIL modes read as RGB


class Images(SeededItems):
    """Images read from files, resized once to a stored side (uint8), augmented per item, normalised.

    Items are ``(path, label)``. With ``cache`` every image is decoded once (by ``workers`` loader
    processes) and kept as one uint8 tensor (N, 3, H, W); otherwise each access decodes its file.
    An item key is an index or ``(index, epoch_seed)``: a seeded key draws the augmentation from
    the seed, so results do not depend on which process loads it or how many there are.
    """

    def __init__(self, items: list[tuple[str, int]], input_hw: tuple[int, int], preset: str = "none",
                 resize: str = "fit", mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 classes: list[str] | None = None, cache: bool | None = None, workers: int = 0):
        self.items, self.size, self.preset, self.resize = items, tuple(input_hw), preset, resize
        self.targets = [lab for _, lab in items]
        self.classes = classes
        h, w = self.size
        self.store = self.size if resize == "fit" else (round(h * 256 / 224), round(w * 256 / 224))
        self.mean_std = (tuple(float(m) for m in mean), tuple(float(v) for v in std))  # as given, for the record
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.transform = _geometry(preset, self.size, self.store)
        self.workers = workers
        self.pixels: torch.Tensor | None = None  # (N, 3, *store) uint8 once prepare() decoded them
        self.cache = cache

    def prepare(self) -> "Images":
        """Read every file now, so a bad one is named before any training or writing: decoded into
        memory when the set fits in :data:`CACHE_BYTES` (or ``cache``), else its header checked."""
        cache = self.cache
        if cache is None:
            cache = len(self.items) * 3 * self.store[0] * self.store[1] <= CACHE_BYTES
        if cache and self.pixels is None:
            self.pixels = self._decode_all(self.workers)
        elif not cache:
            for path, _ in self.items:
                _check_header(path)
        return self

    @property
    def preprocess(self) -> dict:
        return preprocess_meta(self.preset, self.resize, *self.mean_std)

    def __len__(self) -> int:
        return len(self.items)

    def decode(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 (3, *store): shorter side resized to the stored side, centre-cropped."""
        return _decode(self.items[i][0], self.store)

    def _decode_all(self, workers: int) -> torch.Tensor:
        if not self.items:
            return torch.empty(0, 3, *self.store, dtype=torch.uint8)
        loader = torch.utils.data.DataLoader(_Decoder(self), batch_size=64, num_workers=min(workers, len(self.items) // 64),
                                             collate_fn=_as_list)
        out = torch.empty(len(self.items), 3, *self.store, dtype=torch.uint8)
        for batch in loader:
            for i, x in batch:
                if isinstance(x, str):  # a decoding error, reported here in one line (not a worker's traceback)
                    raise SlimkitError(x)
                out[i] = x
        return out

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        x = self.pixels[i] if self.pixels is not None else self.decode(i)  # (3, *store) uint8
        if self.transform is not None:
            x = _seeded(self.transform, x, key) if self.preset != "none" else self.transform(x)
        return x.float().div_(255).sub_(self.mean).div_(self.std), self.targets[i]

    def subset(self, indices: list[int]) -> "Images":
        """The items at ``indices`` (decoded pixels shared, not re-read)."""
        return self._copy(indices, self.preset)

    def _copy(self, indices: list[int], preset: str) -> "Images":
        new = Images.__new__(Images)
        new.__dict__.update(self.__getstate__())
        new.items = [self.items[i] for i in indices]
        new.targets = [self.targets[i] for i in indices]
        new.preset, new.transform = preset, _geometry(preset, self.size, self.store)
        if self.pixels is not None:
            new.pixels = self.pixels[torch.as_tensor(indices, dtype=torch.long)]
        return new


class _Decoder(torch.utils.data.Dataset):
    """Decodes items for the cache; an error comes back as its message (a worker cannot raise one line)."""

    def __init__(self, images: Images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, self.images.decode(i)
        except SlimkitError as exc:
            return i, str(exc)


def _as_list(batch):
    return batch


def _check_mode(path: str, mode: str) -> None:
    if mode not in LOSSLESS_MODES:
        kind = "16-bit" if "16" in mode else "32-bit integer" if mode.startswith("I") else "float" if mode == "F" else "these"
        raise SlimkitError(f"{path}: {kind} pixels (PIL mode {mode}) cannot be read as 8-bit RGB without losing "
                           "their range; convert the images to 8-bit grayscale, RGB or RGBA")


def _unreadable(path: str, exc: Exception) -> SlimkitError:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return SlimkitError(f"{path}: cannot decode this image (not in a format PIL reads)")
    detail = str(exc).splitlines()[0] if str(exc) else "no detail"
    return SlimkitError(f"{path}: cannot decode this image ({type(exc).__name__}: {detail})")


def _check_header(path: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            _check_mode(path, im.mode)
    except SlimkitError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise _unreadable(path, exc) from exc


def _decode(path: str, store: tuple[int, int]) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    try:
        with Image.open(path) as im:
            _check_mode(path, im.mode)
            im = im.convert("RGB")  # grayscale and palette images: equal channels; alpha dropped
    except SlimkitError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise _unreadable(path, exc) from exc
    h, w = store
    im = TF.resize(im, max(h, w), antialias=True)  # shorter side; a square store (the usual) is then covered
    return TF.pil_to_tensor(TF.center_crop(im, [h, w]))


def _scan(root: str, split: str) -> tuple[list[tuple[str, int]], list[str] | None]:
    """(path, label) items of ``split`` in a KE lists/ layout or an ImageFolder tree, and the class folders."""
    import csv
    from pathlib import Path

    root_p = Path(root)
    if not root_p.is_dir():
        raise SlimkitError(f"dataset directory {root} does not exist" if not root_p.exists() else f"{root} is not a directory")
    csv_name = {"train": "trn", "val": "val", "test": "tst"}[split]
    lst = root_p / "lists" / f"{csv_name}.csv"
    if lst.is_file():
        items = []
        with open(lst, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    path, label = root_p / row["file_name"], int(row["label"])
                except (KeyError, ValueError, TypeError) as exc:
                    raise SlimkitError(f"{lst}: each row needs file_name and an integer label") from exc
                if not path.is_file():
                    raise SlimkitError(f"{lst} names {row['file_name']}, which does not exist under {root}")
                if label < 0:
                    raise SlimkitError(f"{lst}: label {label} of {row['file_name']} is negative; labels are 0..C-1")
                items.append((str(path), label))
        if not items:
            raise SlimkitError(f"{lst} lists no images")
        return items, None
    for sub in ([split] + (["val"] if split == "test" else [])):
        if (root_p / sub).is_dir():
            from torchvision.datasets.folder import (
                IMG_EXTENSIONS,
                find_classes,
                make_dataset,
            )

            try:
                classes, class_to_idx = find_classes(str(root_p / sub))
                return make_dataset(str(root_p / sub), class_to_idx, extensions=IMG_EXTENSIONS), classes
            except (FileNotFoundError, RuntimeError) as exc:
                raise SlimkitError(f"{root_p / sub}: {exc}") from exc
    raise SlimkitError(f"{root} has neither lists/{csv_name}.csv nor a {split}/ (or val/) folder of class folders")


def image_dir(root: str, input_shape: tuple[int, ...], split: str = "test", augment: str = "none",
              resize: str | None = None, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
              workers: int = 0, cache: bool | None = None) -> Images:
    """A split of a dataset directory as :class:`Images` of ``input_shape`` (3 channels: RGB).

    Layouts: the Knowledge Evolution one (``lists/{trn,val,tst}.csv`` with ``file_name,label``),
    or an ImageFolder tree (``test/`` or ``val/`` or ``train/`` holding one folder per class).
    Images of any size are resized by ``resize`` (default :func:`resize_policy` of the input
    size); grayscale, palette and RGBA images are read as RGB; 16-bit and float images are refused.
    """
    c, h, w = input_shape
    items, classes = _scan(root, split)  # a missing directory is named before the channel count
    if c != 3:
        raise SlimkitError(f"image folders give RGB images; this network reads {c} channels")
    return Images(items, (h, w), resolve_augment(augment, min(h, w)), resize or resize_policy(min(h, w)),
                  tuple(mean), tuple(std), classes=classes, cache=cache, workers=workers)


def check_same_classes(data: str, train, test) -> None:
    """ImageFolder numbers each split's class folders on its own: the splits must have the same folders."""
    tr_cls, te_cls = getattr(train, "classes", None), getattr(test, "classes", None)
    if tr_cls is not None and te_cls is not None and tr_cls != te_cls:
        only = sorted(set(te_cls) ^ set(tr_cls))
        raise SlimkitError(f"{data}: the train and test splits have different class folders "
                           f"({len(tr_cls)} vs {len(te_cls)}; e.g. {only[0]!r} is in only one), so their "
                           "labels would not match; give both splits the same class folders")


def has_split(root: str, split: str) -> bool:
    """Whether the dataset directory ``root`` holds ``split`` itself (lists/{trn,val,tst}.csv or a folder)."""
    from pathlib import Path

    csv_name = {"train": "trn", "val": "val", "test": "tst"}[split]
    return (Path(root) / "lists" / f"{csv_name}.csv").is_file() or (Path(root) / split).is_dir()


def eval_dataset(data: str, input_shape: tuple[int, ...], meta: dict | None = None,
                 num_classes: int | None = None, split: str = "test", subset: int | None = None,
                 seed: int = 0) -> torch.utils.data.Dataset:
    """A split (the test split by default) named by a CLI ``--data`` value: 'digits' or a directory,
    preprocessed as the checkpoint's ``meta`` records, without augmentation.

    With ``num_classes`` (the network's outputs) the labels must fit: an ImageFolder split needs
    one folder per class (it numbers folders in sorted order, so a missing one shifts the rest).
    ``subset`` keeps that many items, drawn with ``seed`` before any image is decoded.
    """
    c, h, w = input_shape
    gen = torch.Generator().manual_seed(seed)
    if data == "digits":
        if h != w:
            raise SlimkitError(f"digits images are square; this network reads {h}x{w}")
        split_seed = int(((meta or {}).get("data") or {}).get("split_seed", 0))
        ds = digits(split, image_size=h, in_chans=c, seed=split_seed)
        if subset is not None and subset < len(ds):
            ds = torch.utils.data.Subset(ds, torch.randperm(len(ds), generator=gen)[:subset].tolist())
    else:
        # the preprocessing the network was trained with; checkpoints from before it was recorded
        # were trained and evaluated with ImageNet's resize margin and normalisation
        pre = ((meta or {}).get("data") or {}).get("preprocess") or {"resize": "imagenet"}
        ds = image_dir(data, input_shape, split, resize=pre.get("resize", "imagenet"),
                       mean=tuple(pre.get("mean", IMAGENET_MEAN)), std=tuple(pre.get("std", IMAGENET_STD)),
                       workers=default_workers())
        if subset is not None and subset < len(ds):
            ds = ds.subset(torch.randperm(len(ds), generator=gen)[:subset].tolist())
        ds = ds.prepare()
    if num_classes is not None:
        folders = getattr(ds, "classes", None)
        if folders is not None and len(folders) != num_classes:
            raise SlimkitError(f"{data}: the {split} split has {len(folders)} class folders but the network has "
                               f"{num_classes} classes; folders are numbered in sorted order, so every class "
                               "needs one")
        top = int(labels_of(ds).max())
        if top >= num_classes:
            raise SlimkitError(f"{data}: label {top} does not exist in a network with {num_classes} classes")
    return ds
