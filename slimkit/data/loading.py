"""Batches of an epoch (seeded order, loader processes) and labels read without loading images.

:class:`SeededItems` is what a dataset with per-item work (images.py's ``Images``, augment.py's
``Augmented``) derives from: ``epoch_loader`` hands it ``(index, epoch seed)`` keys and keeps its
loader processes on it, so this module imports no dataset."""
from __future__ import annotations

import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.globalstate import usable_cpus


def default_workers() -> int:
    """Loader processes when --workers is not given: one per CPU this process may use, less one, at most 8;
    none below 4 CPUs, where a loader process takes a core from the training step (measured on 2 cores:
    benchmarks/results/data_paths.md)."""
    n = usable_cpus()
    return 0 if n < 4 else min(8, n - 1)


def check_workers(n: int | None) -> int:
    if n is None:
        return default_workers()
    if int(n) < 0:
        raise SlimkitError(f"--workers must be 0 (load in the training process) or more, got {n}")
    return int(n)


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


class SeededItems(torch.utils.data.Dataset):
    """A dataset whose items are read by ``(index, epoch seed)`` keys: ``epoch_loader`` loads it in
    ``workers`` persistent processes (held on the dataset, never pickled with it) when it has per-item
    work (``transform``, or no decoded ``pixels``), each item's augmentation seeded from its key."""

    transform = None  # per-item geometry (torchvision v2) or None
    workers = 0  # loader processes epoch_loader may start

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_loader"}


class _EpochOrder(torch.utils.data.Sampler):
    """The items of one epoch, in order, keyed with the epoch's seed; replaced every epoch (persistent workers)."""

    def __init__(self, order: list[int], seed: int):
        self.order, self.seed = order, seed

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        return iter([(i, self.seed) for i in self.order])


def epoch_loader(dataset: torch.utils.data.Dataset, batch_size: int, seed: int, device: str = "cpu"):
    """The shuffled batches of one training epoch, the permutation drawn from ``seed``.

    Plain in-memory datasets (the digits' TensorDataset) are read as they always were. Image sets
    and augmented sets get their per-item work done in ``dataset.workers`` persistent loader
    processes (pinned memory on CUDA); the order is the one ``shuffle=True`` would draw, and each
    item's augmentation is seeded from (seed, item), so the result does not depend on the workers.
    Under DDP every rank takes its shard of the same seeded permutation.
    """
    from torch.utils.data import DataLoader

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not isinstance(dataset, SeededItems):
        if distributed:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=False,
                          generator=torch.Generator().manual_seed(seed))
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        order = list(DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=False))
    else:  # what RandomSampler draws with this generator
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    pin = str(device).startswith("cuda")
    per_item_work = dataset.transform is not None or getattr(dataset, "pixels", True) is None
    workers = int(getattr(dataset, "workers", 0)) if per_item_work else 0
    if workers == 0:
        return DataLoader(dataset, batch_size=batch_size, sampler=_EpochOrder(order, seed), pin_memory=pin)
    key = (batch_size, pin, workers)
    held = dataset.__dict__.get("_loader")
    if held is None or held[0] != key:
        sampler = _EpochOrder([], 0)
        held = (key, DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                persistent_workers=True, pin_memory=pin), sampler)
        dataset._loader = held
    held[2].order, held[2].seed = order, seed
    return held[1]
