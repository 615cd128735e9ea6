"""What every training verb shares: datasets and the epoch runner (run directory: rundir.py; DDP: distributed.py).

The run directory (config, metrics, state, resume) is :mod:`slimkit.training.rundir`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import Dataset, Subset

from slimkit.data import labels_of
from slimkit.errors import SlimkitError
from slimkit.models import model_params
from slimkit.training.rundir import RunDir

__all__ = ["datasets", "per_class_subset", "shift_augment", "input_kwargs", "StopAfter", "run_epochs", "num_classes_of"]


def datasets(data: str, in_chans: int, image_size: int, train_per_class: int | None = None,
             subset_seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) for "digits" (bundled) or a dataset directory (ImageFolder or KE lists)."""
    from slimkit.data import digits, image_dir

    if data == "digits":
        train = digits("train", image_size=image_size, in_chans=in_chans, seed=0)
        test = digits("test", image_size=image_size, in_chans=in_chans, seed=0)
    else:
        shape = (in_chans, image_size, image_size)
        train, test = image_dir(data, shape, "train", augment=True), image_dir(data, shape, "test")
        tr_cls, te_cls = getattr(train, "classes", None), getattr(test, "classes", None)
        if tr_cls is not None and te_cls is not None and tr_cls != te_cls:
            # ImageFolder numbers each split's class folders on its own: they must be the same folders
            only = sorted(set(te_cls) ^ set(tr_cls))
            raise SlimkitError(f"{data}: the train and test splits have different class folders "
                               f"({len(tr_cls)} vs {len(te_cls)}; e.g. {only[0]!r} is in only one), so their "
                               "labels would not match; give both splits the same class folders")
    if train_per_class is not None:
        train = per_class_subset(train, train_per_class, subset_seed)
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


def per_class_subset(ds: Dataset, k: int, seed: int) -> Subset:
    """A seeded subset with at most ``k`` items of every class."""
    labels = labels_of(ds)
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in labels.unique():
        members = torch.nonzero(labels == c).flatten()
        idx += members[torch.randperm(len(members), generator=g)[:k]].tolist()
    return Subset(ds, sorted(idx))


def shift_augment(x: torch.Tensor) -> torch.Tensor:
    """Random shifts of up to 1/8 of the image: the light augmentation for small digit images."""
    s = max(1, x.shape[-1] // 8)
    dx, dy = torch.randint(-s, s + 1, (2,)).tolist()
    return torch.roll(x, shifts=(dx, dy), dims=(2, 3))


def input_kwargs(arch: str, data: str, image_size: int) -> dict[str, Any]:
    """Input-related constructor arguments, for the small nets that take them."""
    params = model_params(arch)
    kwargs: dict[str, Any] = {}
    if "in_chans" in params:
        kwargs.update(in_chans=1 if data == "digits" else 3)
    if "image_size" in params:
        kwargs.update(image_size=image_size)
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
