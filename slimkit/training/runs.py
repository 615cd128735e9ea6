"""What every training verb shares: datasets, the run directory, metrics, DDP set-up, resume checks.

A run directory holds ``config.json`` (the settings, compared on --resume), ``metrics.jsonl`` (one
JSON record per line), ``state.pt`` (everything needed to continue after the last finished epoch)
and the verb's checkpoints and reports.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from slimkit.data import labels_of
from slimkit.errors import SlimkitError
from slimkit.fileio import atomic_write
from slimkit.models import model_params

__all__ = ["datasets", "per_class_subset", "shift_augment", "input_kwargs", "log_record", "read_records",
           "distributed", "resolve_device", "check_run_dir", "start_run_dir", "barrier", "ddp", "process_group",
           "StopAfter", "run_epochs", "save_state", "load_state", "num_classes_of"]


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


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without one is refused."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise SlimkitError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SlimkitError(f"--device {name}: CUDA is not available on this machine (torch sees no GPU); use cpu or auto")
    if name == "cuda" and int(os.environ.get("LOCAL_RANK", "-1")) >= 0:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # torchrun: one GPU per process
    if name.startswith("cuda:"):
        torch.cuda.set_device(int(name.split(":")[1]))
    return name


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


def input_kwargs(arch: str, data: str, image_size: int) -> dict[str, Any]:
    """Input-related constructor arguments, for the small nets that take them."""
    params = model_params(arch)
    kwargs: dict[str, Any] = {}
    if "in_chans" in params:
        kwargs.update(in_chans=1 if data == "digits" else 3)
    if "image_size" in params:
        kwargs.update(image_size=image_size)
    return kwargs


def log_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group). Launched by torchrun: WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), created


def check_run_dir(out: Path, config: dict[str, Any], resume: bool, verb: str) -> None:
    """Check ``out`` for a new run (absent or empty) or a resume (same settings); writes nothing."""
    cfg_path, state_path = out / "config.json", out / "state.pt"
    if resume:
        if not cfg_path.is_file() or not state_path.is_file():
            raise SlimkitError(f"cannot resume: {out} holds no {verb} run (config.json and state.pt)")
        saved = json.loads(cfg_path.read_text())
        config = json.loads(json.dumps(config))  # as it was written: tuples read back as lists
        diff = [k for k in config if saved.get(k) != config[k]]
        if diff:
            k = diff[0]
            raise SlimkitError(f"cannot resume {out}: it was run with {k}={saved.get(k)!r}, now {k}={config[k]!r}; "
                               "resume with the same settings or choose a new --out")
        return
    if out.exists() and any(out.iterdir()):
        raise SlimkitError(f"output directory {out} is not empty; use --resume {out} to continue it or choose a new --out")
    if not out.parent.is_dir():
        raise SlimkitError(f"cannot create {out}: directory {out.parent} does not exist")


def start_run_dir(out: Path, config: dict[str, Any]) -> None:
    """Create ``out`` and record the settings (rank 0 only, after every rank has checked it)."""
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write(out / "state.pt", lambda tmp: torch.save(state, tmp), force=True)


def load_state(out: Path) -> dict[str, Any]:
    return torch.load(out / "state.pt", map_location="cpu", weights_only=True)


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def ddp(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """``model`` wrapped for data-parallel training when launched by torchrun, else itself."""
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return DistributedDataParallel(model, device_ids=[dev.index])
    return DistributedDataParallel(model)  # shares model's parameters; buffers follow rank 0


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world): joins torchrun's process group when launched by it, and leaves it after."""
    rank, world, created = distributed()
    ok = False
    try:
        yield rank, world
        ok = True
    finally:
        if created:
            import torch.distributed as dist

            if ok:  # ranks > 0 finish first: let rank 0 finish writing before anyone tears gloo down
                dist.barrier()
            dist.destroy_process_group()


class StopAfter:
    """Simulated crash for resume tests: ``tick()`` is true once ``n`` epochs have run (never if None)."""

    def __init__(self, n: int | None):
        self.n, self.done = n, 0

    def tick(self) -> bool:
        self.done += 1
        return self.n is not None and self.done >= self.n


def run_epochs(*, net: torch.nn.Module, model: torch.nn.Module, train: Dataset, test: Dataset, opt, cfg,
               phase: str, start: int, out: Path, main: bool, progress: bool, eval_every: int,
               state: Callable[[int], dict[str, Any]], augment=None, extra_loss=None,
               on_epoch: Callable[[int, dict[str, Any]], None] | None = None, stop: StopAfter | None = None,
               generation: int = 1, device: str = "cpu") -> bool:
    """Train epochs ``start..cfg.epochs-1`` of one phase, logging and checkpointing state after each.

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
        if main:
            if (epoch + 1) % eval_every == 0 or epoch + 1 == cfg.epochs:
                record["test_acc"] = accuracy(model, test, device=device)
            log_record(out / "metrics.jsonl", {**record, "train_seconds": train_s,
                                               "seconds": time.perf_counter() - t0})
            save_state(out, state(epoch + 1))
        if stop is not None and stop.tick():
            return False
    return True
