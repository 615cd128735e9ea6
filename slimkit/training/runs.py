"""What every training verb shares: datasets and the epoch runner (run directory: rundir.py; DDP: distributed.py).

The run directory (config, metrics, state, resume) is :mod:`slimkit.training.rundir`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from slimkit.data import labels_of
from slimkit.errors import SlimkitError
from slimkit.models import model_params
from slimkit.training.rundir import RunDir

__all__ = ["datasets", "per_class_subset", "shift_augment", "input_kwargs", "StopAfter", "run_epochs", "num_classes_of"]


def datasets(data: str, in_chans: int, image_size: int, train_per_class: int | None = None,
             subset_seed: int = 0, augment: str = "auto", workers: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) for "digits" (bundled) or a dataset directory (ImageFolder or KE lists).

    ``augment`` is a preset of :data:`slimkit.data.AUGMENTS` (or auto) for the training split. The
    training split carries ``preprocess`` (what checkpoints record) and ``batch_augment`` (the
    digits' own batch shift, or None when the items are augmented one by one).
    """
    from slimkit.data import (DIGITS_MEAN, DIGITS_STD, Augmented, check_same_classes, digits, image_dir,
                              preprocess_meta, resolve_augment)

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


SMALL_NET_SIZE = 16  # the built-in small nets' input side when --image-size is not given


def input_kwargs(arch: str, data: str, image_size: int | None) -> dict[str, Any]:
    """Input-related arguments of ``create_model``: the small nets' own ``in_chans``/``image_size``;
    for any other source (torchvision, timm, the user's own) ``input_shape`` 3 x S x S when the user
    chose a size S, else nothing (the source's default input, e.g. 3x224x224)."""
    params = model_params(arch)
    kwargs: dict[str, Any] = {}
    if "image_size" in params:
        if "in_chans" in params:
            kwargs.update(in_chans=1 if data == "digits" else 3)
        kwargs.update(image_size=image_size or SMALL_NET_SIZE)
    elif image_size is not None:
        kwargs.update(input_shape=(3, image_size, image_size))
    return kwargs




class StopAfter:
    """Simulated crash for resume tests: ``tick()`` is true once ``n`` epochs have run (never if None)."""

    def __init__(self, n: int | None):
        self.n, self.done = n, 0

    def tick(self) -> bool:
        self.done += 1
        return self.n is not None and self.done >= self.n


def run_epochs(*, net: torch.nn.Module, model: torch.nn.Module, train: Dataset, test: Dataset, opt, cfg,
               phase: str, start: int, run: RunDir, progress: bool, eval_every: int,
               state: Callable[[int], dict[str, Any]], augment=None, extra_loss=None,
               on_epoch: Callable[[int, dict[str, Any]], None] | None = None, stop: StopAfter | None = None,
               generation: int = 1, device: str = "cpu") -> bool:
    """Train epochs ``start..cfg.epochs-1`` of one phase; rank 0 logs to ``run`` and saves its state after each.

    ``net`` is what trains (possibly DDP-wrapped), ``model`` what is evaluated. ``state(epochs_done)``
    gives what state.pt holds after an epoch. Returns False when ``stop`` ended the run early.
    """
    import time

    from slimkit.evaluate import accuracy
    from slimkit.training.loop import train_one_epoch

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        stats = train_one_epoch(net, train, opt, cfg, generation, epoch, augment=augment, progress=progress,
                                desc=phase, extra_loss=extra_loss, device=device)
        train_s = time.perf_counter() - t0
        record = {"kind": "epoch", "phase": phase, "epoch": epoch + 1, **stats}
        if on_epoch is not None:
            on_epoch(epoch, record)  # on every rank: it may change training state (merge's lambda)
        if run.main:
            if (epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs:
                record["test_acc"] = accuracy(model, test, device=device)
            run.log({**record, "train_seconds": train_s, "seconds": time.perf_counter() - t0})
            run.save_state(state(epoch + 1))
        if stop is not None and stop.tick():
            return False
    return True
